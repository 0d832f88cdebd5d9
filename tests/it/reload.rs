//! Reloading the configuration in place (SIGHUP, `POST /reload`, `fanout reload`): a new
//! route set serves from the next request on with no request failed, what the gateway
//! learned stays (cache, spent rate-limit bursts, backend health, in-flight requests of a
//! removed backend, pooled upstream connections, kept mirror pairs, a broadcast target's
//! waiting deliveries), a broken file changes nothing, new certificates reach new handshakes,
//! and a listener change goes through `fanout reload`'s graceful upgrade.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::pki::Ca;
use crate::common::*;
use rustls::pki_types::ServerName;
use serde_json::Value;

/// Two upstreams, `a` and `b`, and `/x` routed to `to`; `extra` adds routes.
fn routes(a: SocketAddr, b: SocketAddr, to: &str, extra: &str) -> String {
    format!(
        "upstreams:\n  a: {{ backends: [\"{a}\"] }}\n  b: {{ backends: [\"{b}\"] }}\n\
         routes:\n  - {{ match: {{ prefix: /x }}, upstream: {to} }}\n{extra}"
    )
}

fn listen(port: u16) -> String {
    format!("[\"127.0.0.1:{port}\"]")
}

/// Keep-alive clients sending `GET /x` one after another until [`Load::finish`]; each
/// answer is a 200 read to its end, or a failure.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    /// What the first failures were (a status, or the client's error), for the message.
    why: Arc<std::sync::Mutex<Vec<String>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gw: &Arc<Gateway>, n: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let why: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let clients = (0..n)
            .map(|_| {
                let (gw, stop, ok, failed, why) = (
                    Arc::clone(gw),
                    Arc::clone(&stop),
                    Arc::clone(&ok),
                    Arc::clone(&failed),
                    Arc::clone(&why),
                );
                tokio::spawn(async move {
                    let c = client(); // its own keep-alive connection
                    while !stop.load(SeqCst) {
                        let failure = match c.get(gw.url("/x")).send().await {
                            Ok(r) if r.status() == 200 => match r.text().await {
                                Ok(_) => None,
                                Err(e) => Some(format!("body: {e:?}")),
                            },
                            Ok(r) => Some(format!(
                                "status {}: {}",
                                r.status(),
                                r.text().await.unwrap_or_default()
                            )),
                            Err(e) => Some(format!("{e:?}")),
                        };
                        match failure {
                            None => ok.fetch_add(1, SeqCst),
                            Some(f) => {
                                let mut w = why.lock().unwrap();
                                if w.len() < 5 {
                                    w.push(f);
                                }
                                failed.fetch_add(1, SeqCst)
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            why,
            clients,
        }
    }

    /// Stops the clients; (answered, failed).
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, SeqCst);
        for c in self.clients {
            c.await.unwrap();
        }
        let why = self.why.lock().unwrap();
        if !why.is_empty() {
            eprintln!("first failures: {why:#?}");
        }
        (self.ok.load(SeqCst), self.failed.load(SeqCst))
    }
}

async fn post_reload(c: &reqwest::Client, gw: &Gateway) -> (u16, Value) {
    let resp = c
        .post(gw.admin_url("/reload"))
        .send()
        .await
        .expect("POST /reload");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON"))
}

/// The process id the control socket in `dir` answers with.
fn control_pid(dir: &std::path::Path) -> u32 {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("upgrade.sock.control"))
        .expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"{\"op\": \"status\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).expect("JSON");
    v["pid"].as_u64().expect("pid") as u32
}

/// Runs `fanout reload -c FILE`: exit success, stdout, stderr.
fn fanout_reload(conf: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(fanout_bin())
        .args(["reload", "-c", &conf.display().to_string()])
        .output()
        .expect("run fanout reload");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_post_and_the_command_apply_a_file_and_a_broken_one_changes_nothing() {
    let (a, b) = (Backend::start("A").await, Backend::start("B").await);
    let gw = Gateway::start(&routes(a.addr, b.addr, "a", ""));
    let c = client();
    assert_eq!(get(&c, &gw.url("/x")).await.1, "A");

    // SIGHUP, which used to end the process.
    gw.rewrite(&listen(gw.port), &routes(a.addr, b.addr, "b", ""));
    signal(gw.pid(), "-HUP");
    eventually(
        Duration::from_secs(10),
        "SIGHUP's file in force",
        || async { get(&c, &gw.url("/x")).await.1 == "B" },
    )
    .await;
    let status = status_json(&c, &gw).await;
    assert_eq!(status["config"]["generation"], 2, "{status}");
    assert_eq!(status["config"]["last_reload"]["result"], "ok", "{status}");
    assert_eq!(metric(&c, &gw, "fanout_config_generation").await, 2);
    assert_eq!(
        metric(&c, &gw, "fanout_config_reloads_total{result=\"ok\"}").await,
        1
    );

    // A broken file: refused with its line, the running configuration stays.
    gw.rewrite(
        &listen(gw.port),
        &routes(
            a.addr,
            b.addr,
            "nowhere",
            "  - { match: { prefix: /y }, upstream: a, bogus: 1 }\n",
        ),
    );
    let (code, answer) = post_reload(&c, &gw).await;
    assert_eq!(code, 422, "{answer}");
    let errors = answer["errors"].as_array().expect("errors").clone();
    assert!(errors.len() >= 2, "one line per problem: {answer}");
    assert!(
        errors
            .iter()
            .all(|e| e.as_str().unwrap_or("").contains("fanout.yaml:")),
        "file:line on each: {answer}"
    );
    let (ok, _, stderr) = fanout_reload(&gw.conf_path());
    assert!(!ok, "fanout reload must fail on a broken file");
    assert!(stderr.contains("nowhere"), "{stderr}");
    assert_eq!(
        get(&c, &gw.url("/x")).await.1,
        "B",
        "the old file still serves"
    );
    assert_eq!(status_json(&c, &gw).await["config"]["generation"], 2);
    assert_eq!(
        metric(&c, &gw, "fanout_config_reloads_total{result=\"error\"}").await,
        1,
        "the command checks the file itself: only POST reached the process"
    );

    // `fanout reload` with a good file: in place, exit 0 once it serves.
    gw.rewrite(&listen(gw.port), &routes(a.addr, b.addr, "a", ""));
    let (ok, stdout, stderr) = fanout_reload(&gw.conf_path());
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("in place as generation 3"), "{stdout}");
    assert_eq!(get(&c, &gw.url("/x")).await.1, "A");

    // GET /config: the file in force, with its generation and hash.
    let config = admin_json(&c, &gw, "/config").await;
    assert_eq!(config["generation"], 3, "{config}");
    assert_eq!(config["config"]["routes"][0]["upstream"], "a", "{config}");
    assert_eq!(config["hash"], status_json(&c, &gw).await["config"]["hash"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_fail_no_request() {
    let (a, b) = (Backend::start("A").await, Backend::start("B").await);
    let gw = Arc::new(Gateway::start(&routes(a.addr, b.addr, "a", "")));
    let load = Load::start(&gw, 8);
    let c = client();
    let started = Instant::now();
    for i in 1..=50u64 {
        let to = if i % 2 == 1 { "b" } else { "a" };
        gw.rewrite(&listen(gw.port), &routes(a.addr, b.addr, to, ""));
        let (code, answer) = post_reload(&c, &gw).await;
        assert_eq!(code, 200, "reload {i}: {answer}");
        assert_eq!(answer["generation"], i + 1);
        // The next request is answered by the generation now in force.
        let (status, backend, _) = get(&c, &gw.url("/x")).await;
        assert_eq!(
            (status, backend.as_str()),
            (200, to.to_uppercase().as_str()),
            "after reload {i}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await; // 50 reloads in about 10 s
    }
    let took = started.elapsed();
    let (ok, failed) = load.finish().await;
    eprintln!("50 reloads in {took:?}: {ok} requests answered, {failed} failed");
    assert_eq!(failed, 0, "{ok} answered");
    assert!(ok > 500, "the load ran: {ok}");
    assert_eq!(
        metric(&c, &gw, "fanout_config_reloads_total{result=\"ok\"}").await,
        50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_gateway_learned_survives_a_reload() {
    let (a, b) = (Backend::start("A").await, Backend::start("B").await);
    let (sick, well) = (Backend::start("SICK").await, Backend::start("WELL").await);
    let (d1, d2) = (Backend::start("D1").await, Backend::start("D2").await);
    sick.set_healthy(false);
    let body = |extra_route: &str, d_backends: &str| {
        format!(
            "upstreams:\n  a: {{ backends: [\"{a}\"] }}\n  b: {{ backends: [\"{b}\"] }}\n  \
             h:\n    backends: [\"{sick}\", \"{well}\"]\n    \
             health_check: {{ type: http, path: /health, interval: 200ms, timeout: 1s, healthy_after: 2, unhealthy_after: 1 }}\n  \
             d: {{ backends: [{d_backends}] }}\n\
             routes:\n  \
             - {{ match: {{ prefix: /c }}, upstream: a, cache: {{ ttl: 60s }} }}\n  \
             - {{ match: {{ prefix: /r }}, upstream: a, rate_limit: {{ requests_per_second: 0.01, burst: 3 }} }}\n  \
             - {{ match: {{ prefix: /h }}, upstream: h }}\n  \
             - {{ match: {{ prefix: /d }}, upstream: d }}\n{extra_route}",
            a = a.addr,
            b = b.addr,
            sick = sick.addr,
            well = well.addr,
        )
    };
    let both = format!("\"{}\", \"{}\"", d1.addr, d2.addr);
    let gw = Gateway::start(&body("", &both));
    let c = client();

    // Learn: the sick backend is out, /c is cached, /r's burst is spent.
    eventually(
        Duration::from_secs(10),
        "the sick backend marked down",
        || async {
            let s = status_json(&c, &gw).await;
            s["upstreams"].as_array().unwrap().iter().any(|u| {
                u["name"] == "h"
                    && u["backends"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|b| b["address"] == sick.addr.to_string() && b["healthy"] == false)
            })
        },
    )
    .await;
    let cache = |c: reqwest::Client, url: String| async move {
        let r = c.get(url).send().await.unwrap();
        r.headers()["x-cache"].to_str().unwrap().to_string()
    };
    assert_eq!(cache(c.clone(), gw.url("/c")).await, "MISS");
    assert_eq!(cache(c.clone(), gw.url("/c")).await, "HIT");
    let mut spent = false;
    for _ in 0..10 {
        if get(&c, &gw.url("/r")).await.0 == 429 {
            spent = true;
            break;
        }
    }
    assert!(spent, "the burst ran out");
    // A slow request in flight on D2, which the reload removes.
    d2.set_delay(1500);
    let slow = {
        let c = c.clone();
        let mut tries = Vec::new();
        for _ in 0..2 {
            let (c, url) = (c.clone(), gw.url("/d"));
            tries.push(tokio::spawn(async move { get(&c, &url).await }));
        }
        tries
    };
    eventually(Duration::from_secs(5), "a request held by D2", || async {
        d2.state.inflight.load(SeqCst) == 1
    })
    .await;

    // A one-route change, and D2 gone from `d`.
    gw.rewrite(
        &listen(gw.port),
        &body(
            "  - { match: { prefix: /new }, upstream: b }\n",
            &format!("\"{}\"", d1.addr),
        ),
    );
    let (code, answer) = post_reload(&c, &gw).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        get(&c, &gw.url("/new")).await.1,
        "B",
        "the new route serves"
    );

    assert_eq!(
        cache(c.clone(), gw.url("/c")).await,
        "HIT",
        "the cache stays"
    );
    let fetched = a.seen().iter().filter(|s| s.path == "/c").count();
    assert_eq!(fetched, 1, "/c was fetched once, before the reload");
    assert_eq!(
        get(&c, &gw.url("/r")).await.0,
        429,
        "a spent burst stays spent"
    );
    let sick_hits = sick.hits();
    for _ in 0..20 {
        assert_eq!(get(&c, &gw.url("/h")).await.1, "WELL");
    }
    assert_eq!(sick.hits(), sick_hits, "the unhealthy backend gets nothing");
    for t in slow {
        let (status, _, _) = t.await.unwrap();
        assert_eq!(status, 200, "the removed backend's request finished");
    }
    let d2_hits = d2.hits();
    for _ in 0..10 {
        assert_eq!(get(&c, &gw.url("/d")).await.1, "D1");
    }
    assert_eq!(
        d2.hits(),
        d2_hits,
        "the removed backend gets no new request"
    );
}

/// The leaf certificate a handshake with `name` on `port` gets.
async fn served_leaf(ca: &Ca, port: u16, name: &str) -> Vec<u8> {
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let server = ServerName::try_from(name.to_string()).unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(server, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_new_certificates_to_new_handshakes() {
    let a = Backend::start("A").await;
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "reload");
    let first = ca.issue(&dir, "site", &["site.test"]);
    let tls_listen = |port: u16| {
        format!(
            "[{{ address: \"127.0.0.1:{port}\", tls: {{ certificates: [{{ cert: {}, key: {} }}] }} }}]",
            first.cert.display(),
            first.key.display()
        )
    };
    let body = format!(
        "upstreams:\n  a: {{ backends: [\"{}\"] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: a }}\n",
        a.addr
    );
    let gw = Gateway::start_listening(tls_listen, &body);
    assert_eq!(served_leaf(&ca, gw.port, "site.test").await, first.der);

    // The files are replaced in place (the same paths), as certbot or cert-manager do.
    let next_dir = scratch_dir();
    let second = ca.issue(&next_dir, "site", &["site.test"]);
    std::fs::copy(&second.cert, &first.cert).unwrap();
    std::fs::copy(&second.key, &first.key).unwrap();
    let c = client();
    let (code, answer) = post_reload(&c, &gw).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        served_leaf(&ca, gw.port, "site.test").await,
        second.der,
        "a new handshake gets the new certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_change_goes_through_the_upgrade_with_no_failed_request() {
    let (a, b) = (Backend::start("A").await, Backend::start("B").await);
    let gw = Arc::new(Gateway::start(&routes(a.addr, b.addr, "a", "")));
    let load = Load::start(&gw, 4);
    let second = free_port();
    gw.rewrite(
        &format!("[\"127.0.0.1:{}\", \"127.0.0.1:{second}\"]", gw.port),
        &routes(a.addr, b.addr, "b", ""),
    );
    let conf = gw.conf_path();
    let (done, stdout, stderr) = tokio::task::spawn_blocking(move || fanout_reload(&conf))
        .await
        .unwrap();
    assert!(done, "{stdout}{stderr}");
    assert!(stdout.contains("listen:"), "the change is named: {stdout}");
    assert!(stdout.contains("graceful upgrade"), "{stdout}");
    let c = client();
    assert_eq!(
        get(&c, &format!("http://127.0.0.1:{second}/x")).await.1,
        "B"
    );
    // Load goes on across the hand-over, until the old process has gone.
    let mut old = gw.pid();
    assert_ne!(control_pid(&gw.dir), old, "the new process answers");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&format!("/proc/{old}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{old}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(Instant::now() < deadline, "the old process did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, failed) = load.finish().await;
    // The successor is the test's to stop.
    old = control_pid(&gw.dir);
    assert_ne!(old, gw.pid());
    signal(old, "-KILL");
    eprintln!("upgrade: {ok} requests answered, {failed} failed");
    assert_eq!(failed, 0, "{ok} answered");
    assert!(ok > 100, "the load ran: {ok}");
}

/// The `pending` count of the first target of the broadcast route named `events`.
async fn pending(c: &reqwest::Client, gw: &Gateway) -> u64 {
    let s = status_json(c, gw).await;
    let route = s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "events")
        .cloned()
        .unwrap_or_default();
    route["targets"][0]["pending"].as_u64().unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_mirror_pairs_and_broadcast_queues_survive_a_reload() {
    let pooled = RawBackend::start().await;
    let (a, b) = (Backend::start("A").await, Backend::start("B").await);
    let target = Backend::start("T").await;
    target.set_status(503);
    let body = |extra: &str| {
        format!(
            "upstreams:\n  p: {{ backends: [\"{}\"] }}\n  a: {{ backends: [\"{}\"] }}\n  \
             b: {{ backends: [\"{}\"] }}\n  t: {{ backends: [\"{}\"] }}\n\
             routes:\n  \
             - {{ match: {{ prefix: /p }}, upstream: p }}\n  \
             - {{ match: {{ prefix: /m }}, upstream: a, mirror: [{{ upstream: b, compare: {{ ignore_headers: [X-Backend] }} }}] }}\n  \
             - {{ name: events, match: {{ prefix: /events }}, broadcast: [t] }}\n{extra}",
            pooled.addr, a.addr, b.addr, target.addr
        )
    };
    let gw = Gateway::start(&body(""));
    let c = client();

    // Learn: a pooled upstream connection, a differing mirror pair, a delivery waiting.
    for _ in 0..5 {
        assert_eq!(get(&c, &gw.url("/p")).await.0, 200);
    }
    assert_eq!(pooled.connections(), 1, "one pooled connection");
    assert_eq!(get(&c, &gw.url("/m")).await.1, "A");
    eventually(Duration::from_secs(10), "a kept pair", || async {
        admin_json(&c, &gw, "/mirror/diffs")
            .await
            .as_array()
            .map(Vec::len)
            == Some(1)
    })
    .await;
    let kept = admin_json(&c, &gw, "/mirror/diffs").await[0]["request_id"].clone();
    let accepted = c.post(gw.url("/events")).body("e1").send().await.unwrap();
    assert_eq!(accepted.status(), 202);
    eventually(
        Duration::from_secs(10),
        "a failed delivery waiting",
        || async { target.hits() >= 1 && pending(&c, &gw).await == 1 },
    )
    .await;

    gw.rewrite(
        &listen(gw.port),
        &body(
            "  - { match: { prefix: /new }, upstream: a }
",
        ),
    );
    let (code, answer) = post_reload(&c, &gw).await;
    assert_eq!(code, 200, "{answer}");

    for _ in 0..5 {
        assert_eq!(get(&c, &gw.url("/p")).await.0, 200);
    }
    assert_eq!(pooled.connections(), 1, "the pooled connection is reused");
    let diffs = admin_json(&c, &gw, "/mirror/diffs").await;
    assert_eq!(diffs.as_array().map(Vec::len), Some(1), "{diffs}");
    assert_eq!(diffs[0]["request_id"], kept, "the same pair is kept");
    assert_eq!(pending(&c, &gw).await, 1, "the delivery still waits");
    target.set_status(200);
    eventually(
        Duration::from_secs(15),
        "the waiting delivery made",
        || async { pending(&c, &gw).await == 0 },
    )
    .await;
    let delivered = target.seen().iter().filter(|s| s.body == "e1").count();
    assert!(
        delivered >= 2,
        "tried before the reload and delivered after: {delivered}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_in_flight_stay_counted_against_max_inflight_across_a_reload() {
    let a = Backend::start("A").await;
    let slow = RawBackend::silent().await;
    let body = |extra: &str| {
        format!(
            "upstreams:\n  a: {{ backends: [\"{}\"] }}\n  slow: {{ backends: [\"{}\"] }}\n\
             routes:\n  - {{ match: {{ prefix: /s }}, upstream: a, mirror: [{{ upstream: slow, max_inflight: 1, timeout: 30s }}] }}\n{extra}",
            a.addr, slow.addr
        )
    };
    let gw = Gateway::start(&body(""));
    let c = client();
    let dropped =
        "fanout_mirror_requests_total{outcome=\"dropped\",route=\"prefix:/s\",upstream=\"slow\"}";
    assert_eq!(get(&c, &gw.url("/s")).await.0, 200);
    eventually(
        Duration::from_secs(10),
        "the copy held by the mirror",
        || async { slow.count("GET /s") == 1 },
    )
    .await;

    gw.rewrite(
        &listen(gw.port),
        &body("  - { match: { prefix: /new }, upstream: a }\n"),
    );
    let (code, answer) = post_reload(&c, &gw).await;
    assert_eq!(code, 200, "{answer}");

    // The copy under way still holds the mirror's one slot: the next copy is dropped.
    assert_eq!(get(&c, &gw.url("/s")).await.0, 200);
    eventually(
        Duration::from_secs(10),
        "the second copy dropped",
        || async {
            metrics_text(&c, &gw)
                .await
                .contains(&format!("{dropped} 1"))
        },
    )
    .await;
    assert_eq!(slow.count("GET /s"), 1, "no second copy sent");
}
