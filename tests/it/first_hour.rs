//! What a new user meets in the first hour (issue 42): a port that cannot be bound ends the
//! start at once and nothing says it runs; an http→https redirect that cannot loop
//! (`match.scheme`, `match.listener`) and `-t` refusing one that would.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::pki::Ca;
use crate::common::*;

/// Runs fanout with `args` until it exits (at most `limit`): its status, stdout and stderr;
/// `None` if it still ran then (it is killed).
fn run_until_exit(args: &[String], limit: Duration) -> Option<(i32, String, String)> {
    let dir = scratch_dir();
    let file = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).expect("log"));
    let mut child = Command::new(fanout_bin())
        .args(args)
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        .spawn()
        .expect("spawn fanout");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let out = status.map(|s| (s.code().unwrap_or(-1), read("stdout"), read("stderr")));
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// A configuration file in a scratch directory.
fn conf_file(yaml: &str) -> String {
    let dir = scratch_dir();
    let path = dir.join("fanout.yaml");
    let yaml = format!(
        "server: {{ threads: 1, pid_file: {d}/fanout.pid, upgrade_sock: {d}/upgrade.sock }}\n{yaml}",
        d = dir.display()
    );
    std::fs::write(&path, yaml).expect("write conf");
    path.display().to_string()
}

/// A port held by this test: whoever else tries to listen there finds it in use.
fn taken() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    (l, port)
}

/// fanout ends within 5 s, non-zero, with one line naming `port` as in use, and said
/// nothing about running.
fn assert_refused(args: Vec<String>, port: u16, role: &str) {
    let started = Instant::now();
    let (code, stdout, stderr) =
        run_until_exit(&args, Duration::from_secs(5)).expect("fanout exits within 5 s");
    assert_ne!(code, 0, "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cannot listen"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(
        lines[0].contains("in use") && lines[0].contains(role),
        "{stderr}"
    );
    assert!(!stderr.contains("will try again"), "{stderr}");
    assert!(
        !stdout.contains("running") && !stderr.contains("serving on"),
        "{stdout}{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

fn upstream_and_route(backend: SocketAddr) -> String {
    format!(
        "upstreams:\n  u: {{ backends: [\"{backend}\"] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_ends_the_start_for_every_listener_kind() {
    let backend = Backend::start("b").await;
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "busy");
    let cert = ca.issue(&dir, "a", &["a.test"]);
    let body = upstream_and_route(backend.addr);
    let (_held, port) = taken();
    let free = free_port();
    let admin = free_port();

    // Plain HTTP/1.1, with the admin listener free: /health must never have answered.
    let plain = conf_file(&format!(
        "listen: [\"127.0.0.1:{port}\"]\nadmin: 127.0.0.1:{admin}\n{body}"
    ));
    assert_refused(vec!["-c".into(), plain], port, "listener");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", admin)).is_err(),
        "the admin listener of a failed start is gone"
    );

    // TLS.
    let tls = conf_file(&format!(
        "listen:\n  - {{ address: \"127.0.0.1:{free}\" }}\n  - {{ address: \"127.0.0.1:{port}\", \
         tls: {{ certificates: [{{ cert: {}, key: {} }}] }} }}\n{body}",
        cert.cert.display(),
        cert.key.display()
    ));
    assert_refused(vec!["-c".into(), tls], port, "listener");

    // h2c.
    let h2c = conf_file(&format!(
        "listen: [{{ address: \"127.0.0.1:{port}\", http2: true }}]\n{body}"
    ));
    assert_refused(vec!["-c".into(), h2c], port, "listener");

    // The admin listener, the proxy's own port free.
    let admin_busy = conf_file(&format!(
        "listen: [\"127.0.0.1:{free}\"]\nadmin: 127.0.0.1:{port}\n{body}"
    ));
    assert_refused(vec!["-c".into(), admin_busy], port, "admin listener");

    // Quick mode, as the issue's user ran it.
    let quick = vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--backends".into(),
        format!("http://{}", backend.addr),
        "--admin".into(),
        format!("127.0.0.1:{admin}"),
    ];
    assert_refused(quick, port, "listener");

    // The demo prints its instructions only once it serves.
    let demo = vec![
        "--demo".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--admin".into(),
        format!("127.0.0.1:{admin}"),
    ];
    assert_refused(demo, port, "listener");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_says_it_runs_once_it_serves() {
    let gw = Gateway::demo();
    // Printed only after both listeners were bound; the gateway answers at once.
    stdout_line(&gw, "fanout demo is running").await;
    let (status, body, _) = get(&client(), &gw.url("/api/hello")).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_to_https_redirect_cannot_loop() {
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "redirect");
    let cert = ca.issue(&dir, "a", &["app.test"]);
    let backend = Backend::start("app").await;
    let tls_port = free_port();
    let gw = Gateway::start_listening(
        |port| {
            format!(
                "\n  - {{ address: \"127.0.0.1:{port}\", name: public }}\n  - {{ address: \"127.0.0.1:{tls_port}\", \
                 tls: {{ certificates: [{{ cert: {}, key: {} }}] }} }}",
                cert.cert.display(),
                cert.key.display()
            )
        },
        &format!(
            "upstreams:\n  app: {{ backends: [\"{}\"] }}\nroutes:\n\
             \x20 - match: {{ prefix: /, scheme: http }}\n    redirect: {{ to: \"https://{{host}}:{tls_port}{{path}}{{query}}\", status: 308 }}\n\
             \x20 - match: {{ prefix: / }}\n    upstream: app\n    response_headers: {{ set: {{ Strict-Transport-Security: max-age=63072000 }} }}\n",
            backend.addr
        ),
    );
    // Followed as curl -L does: one redirect, then the answer over TLS.
    let c = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.reqwest_root())
        .resolve("app.test", SocketAddr::from(([127, 0, 0, 1], gw.port)))
        .resolve("app.test", SocketAddr::from(([127, 0, 0, 1], tls_port)))
        .redirect(reqwest::redirect::Policy::limited(2))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = c
        .get(format!("http://app.test:{}/page?x=1", gw.port))
        .send()
        .await
        .expect("followed without a loop");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.url().as_str(),
        format!("https://app.test:{tls_port}/page?x=1")
    );
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=63072000"
    );
    assert_eq!(backend.hits(), 1);
}

#[test]
fn check_refuses_a_redirect_to_itself_and_unknown_listeners() {
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "t");
    let cert = ca.issue(&dir, "a", &["a.test"]);
    let listen = format!(
        "listen:\n  - {{ address: \"127.0.0.1:1\", name: web }}\n  - {{ address: \"127.0.0.1:2\", name: secure, \
         tls: {{ certificates: [{{ cert: {}, key: {} }}] }} }}\n",
        cert.cert.display(),
        cert.key.display()
    );
    let routes = |r: &str| {
        format!("{listen}upstreams:\n  u: {{ backends: [\"127.0.0.1:3\"] }}\nroutes:\n{r}")
    };

    // The route also answers on the TLS listener: https://x/ → https://x/ forever.
    let (ok, text) = check_yaml(&routes(
        "  - { match: { prefix: / }, redirect: { to: \"https://{host}{path}\" } }\n",
    ));
    assert!(
        !ok && text.contains("routes[0].redirect.to") && text.contains("loop"),
        "{text}"
    );
    // Same for the route's own host written out, and for a path kept under its prefix.
    let (ok, text) = check_yaml(&routes(
        "  - { match: { prefix: /, host: example.com }, redirect: { to: \"https://example.com{path}\" } }\n",
    ));
    assert!(!ok && text.contains("loop"), "{text}");
    let (ok, text) = check_yaml(&routes(
        "  - { match: { prefix: /, scheme: http }, redirect: { to: \"/new{path}\" } }\n",
    ));
    assert!(!ok && text.contains("loop"), "{text}");

    // Narrowed to plain HTTP, by scheme or by listener: fine.
    for r in [
        "  - { match: { prefix: /, scheme: http }, redirect: { to: \"https://{host}{path}{query}\" } }\n",
        "  - { match: { prefix: /, listener: web }, redirect: { to: \"https://{host}{path}{query}\" } }\n",
        "  - { match: { prefix: /old }, redirect: { to: \"https://{host}/new{path}\" } }\n",
        "  - { match: { prefix: / }, redirect: { to: \"https://elsewhere.example{path}\" } }\n",
    ] {
        let (ok, text) = check_yaml(&routes(r));
        assert!(ok, "{r}: {text}");
    }

    // A listener that does not exist, a scheme that is not one, a listener that cannot
    // take the scheme asked for.
    let (ok, text) = check_yaml(&routes(
        "  - { match: { prefix: /, listener: nope }, upstream: u }\n\
         \x20 - { match: { prefix: /a, scheme: ftp }, upstream: u }\n\
         \x20 - { match: { prefix: /b, scheme: https, listener: web }, upstream: u }\n",
    ));
    assert!(!ok, "{text}");
    assert!(
        text.contains("routes[0].match.listener") && text.contains("web, secure"),
        "{text}"
    );
    assert!(text.contains("routes[1].match.scheme"), "{text}");
    assert!(
        text.contains("routes[2].match") && text.contains("never match"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_webhooks_get_their_own_host_and_the_spool_and_token_flags_work() {
    let hook = Backend::start("hook").await;
    let port = hook.addr.port();
    let dir = scratch_dir();
    let token = dir.join("admin.token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let spool = dir.join("spool");
    let (token_arg, spool_arg) = (token.display().to_string(), spool.display().to_string());
    let gw = Gateway::spawn_with(|p, admin| {
        vec![
            "--listen".into(),
            format!("127.0.0.1:{p}"),
            "--broadcast".into(),
            format!("http://localhost:{port}/hook"),
            "--admin".into(),
            format!("127.0.0.1:{admin}"),
            "--admin-token-file".into(),
            token_arg.clone(),
            "--spool".into(),
            spool_arg.clone(),
        ]
    });
    let c = client();
    let resp = c
        .post(gw.url("/events"))
        .header("host", "gateway.example:8086")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    eventually(Duration::from_secs(15), "the delivery", || async {
        !hook.seen().is_empty()
    })
    .await;
    // The receiver is reached by name: the Host is its own, not the client's.
    assert_eq!(
        hook.seen()[0].headers["host"],
        format!("localhost:{port}").as_str()
    );
    assert_eq!(hook.seen()[0].path, "/hook");
    // The spool is on disk, and the admin listener wants the token.
    assert!(spool.is_dir(), "--spool made the directory");
    let (status, _, _) = get(&c, &gw.admin_url("/status")).await;
    assert_eq!(status, 401);
    let resp = c
        .get(gw.admin_url("/status"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, _, _) = get(&c, &gw.admin_url("/health")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_pass_backend_and_literal() {
    let backend = Backend::start("b").await;
    let port = backend.addr.port();
    let gw = Gateway::start(&format!(
        "upstreams:\n\
         \x20 pass: {{ backends: [\"127.0.0.1:{port}\"] }}\n\
         \x20 own: {{ backends: [\"127.0.0.1:{port}\"], host_header: backend }}\n\
         \x20 fixed: {{ backends: [\"127.0.0.1:{port}\"], host_header: api.internal }}\n\
         routes:\n\
         \x20 - {{ match: {{ prefix: /pass }}, upstream: pass }}\n\
         \x20 - {{ match: {{ prefix: /own }}, upstream: own }}\n\
         \x20 - {{ match: {{ prefix: /fixed }}, upstream: fixed, mirror: [{{ upstream: own }}] }}\n"
    ));
    let c = client();
    for path in ["/pass", "/own", "/fixed"] {
        let resp = c
            .get(gw.url(path))
            .header("host", "client.example")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    eventually(Duration::from_secs(10), "the mirror copy", || async {
        backend.seen().len() >= 4
    })
    .await;
    let hosts: Vec<(String, String)> = backend
        .seen()
        .iter()
        .map(|s| {
            (
                s.path.clone(),
                s.headers["host"].to_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        hosts.contains(&("/pass".into(), "client.example".into())),
        "{hosts:?}"
    );
    assert!(
        hosts.contains(&("/own".into(), format!("127.0.0.1:{port}"))),
        "{hosts:?}"
    );
    assert!(
        hosts.contains(&("/fixed".into(), "api.internal".into())),
        "{hosts:?}"
    );
    // The mirror copy goes to `own`, which names itself.
    let copies = hosts.iter().filter(|(p, _)| p == "/fixed").count();
    assert_eq!(copies, 2, "{hosts:?}");
    assert!(
        hosts.contains(&("/fixed".into(), format!("127.0.0.1:{port}"))),
        "{hosts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_costs_no_request_even_by_name() {
    // The Go reverse proxy's own start: two backends by name, one of them stopped. The
    // live one listens on IPv4 only, so `localhost`'s IPv6 address refuses too.
    let live = Backend::start("live").await;
    let stopped = free_port();
    let backends = format!(
        "http://localhost:{},http://localhost:{stopped}",
        live.addr.port()
    );
    let gw = Gateway::spawn_with(|port, admin| {
        vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--backends".into(),
            backends.clone(),
            "--admin".into(),
            format!("127.0.0.1:{admin}"),
        ]
    });
    let c = client();
    let mut failed = Vec::new();
    for i in 0..1000 {
        let (status, _, _) = get(&c, &gw.url(&format!("/r/{i}"))).await;
        if status != 200 {
            failed.push((i, status));
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(live.hits(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_failure_tries_every_backend_whatever_retries_says() {
    let live = Backend::start("live").await;
    let dead: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    retries: 0\n    backends: [\"127.0.0.1:{}\", \"127.0.0.1:{}\", \"127.0.0.1:{}\", \"{}\"]\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        dead[0], dead[1], dead[2], live.addr
    ));
    let c = client();
    // The first requests meet every dead backend before passive ejection takes them out.
    for i in 0..20 {
        let resp = c
            .post(gw.url(&format!("/p/{i}")))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
    }
    assert_eq!(live.hits(), 20);
    // With every backend dead (the three first ones taken out by now), the answer is 502.
    live.kill();
    let resp = c.get(gw.url("/gone")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_are_drained_disabled_and_enabled_and_a_reload_keeps_the_mark() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let body = |a: SocketAddr, b: SocketAddr, retries: u32| {
        format!(
            "upstreams:\n  u:\n    retries: {retries}\n    backends:\n      - {{ address: \"{a}\", name: one }}\n      - \"{b}\"\n\
             routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n"
        )
    };
    let gw = Gateway::start(&body(a.addr, b.addr, 1));
    let c = client();
    let status = status_json(&c, &gw).await;
    let listed = &status["upstreams"][0]["backends"];
    assert_eq!(listed[0]["name"], "one", "{status}");
    assert_eq!(listed[0]["state"], "active", "{status}");

    // A slow request is on `one` when it is drained: it finishes; new requests avoid it.
    a.set_delay(600);
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let (c, url) = (c.clone(), gw.url(&format!("/slow/{i}")));
            tokio::spawn(async move { c.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "a request in flight on one",
        || async { a.state.inflight.load(std::sync::atomic::Ordering::SeqCst) > 0 },
    )
    .await;
    let post = |what: &'static str, who: &'static str| {
        let (c, url) = (
            c.clone(),
            gw.admin_url(&format!("/upstreams/u/backends/{who}/{what}")),
        );
        async move { c.post(url).send().await.unwrap().status().as_u16() }
    };
    // A browser's request from another site is refused (no token is configured here).
    for (header, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = c
            .post(gw.admin_url("/upstreams/u/backends/one/disable"))
            .header(header, value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{header}: {value}");
    }
    let status = status_json(&c, &gw).await;
    assert_eq!(status["upstreams"][0]["backends"][0]["state"], "active");
    assert_eq!(post("drain", "one").await, 200);
    for t in slow {
        assert_eq!(t.await.unwrap(), 200, "a request in flight finishes");
    }
    a.set_delay(0);
    let hits_a = a.hits();
    for i in 0..10 {
        assert_eq!(get(&c, &gw.url(&format!("/d/{i}"))).await.0, 200);
    }
    assert_eq!(a.hits(), hits_a, "a drained backend gets no new request");
    let status = status_json(&c, &gw).await;
    assert_eq!(status["upstreams"][0]["backends"][0]["state"], "draining");

    // A reload that keeps the backend keeps the mark.
    gw.rewrite(
        &format!("[\"127.0.0.1:{}\"]", gw.port),
        &body(a.addr, b.addr, 2),
    );
    let r = c.post(gw.admin_url("/reload")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for i in 0..10 {
        assert_eq!(get(&c, &gw.url(&format!("/r/{i}"))).await.0, 200);
    }
    assert_eq!(a.hits(), hits_a, "still drained after the reload");

    // Disabled by address, then enabled by name: it takes requests again.
    assert_eq!(post("disable", "ADDR").await, 404);
    let addr = a.addr.to_string();
    let r = c
        .post(gw.admin_url(&format!("/upstreams/u/backends/{addr}/disable")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(post("enable", "one").await, 200);
    for i in 0..10 {
        assert_eq!(get(&c, &gw.url(&format!("/e/{i}"))).await.0, 200);
    }
    assert!(a.hits() > hits_a, "enabled again");
    assert_eq!(post("explode", "one").await, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_logs_at_most_three_lines() {
    let backend = Backend::start("b").await;
    let gw = Gateway::spawn_env(
        |_, _| vec![("RUST_LOG".to_string(), String::new())],
        |port, admin| {
            vec![
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--backends".into(),
                format!("http://{}", backend.addr),
                "--admin".into(),
                format!("127.0.0.1:{admin}"),
            ]
        },
    );
    eventually(Duration::from_secs(5), "the serving line", || async {
        gw.stderr().contains("serving on")
    })
    .await;
    let (status, _, _) = get(&client(), &gw.url("/x")).await;
    assert_eq!(status, 200);
    let stderr = gw.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() <= 3,
        "{} lines at start:\n{stderr}",
        lines.len()
    );
    assert!(!stderr.contains("pingora"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_each_backends_answers_and_its_last_health_check() {
    let a = Backend::start("a").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    backends: [{{ address: \"{}\", name: one }}]\n    \
         health_check: {{ path: /health, interval: 200ms, timeout: 1s, unhealthy_after: 1, healthy_after: 1 }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        a.addr
    ));
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, &gw.url("/ok")).await.0, 200);
    }
    a.set_status(404);
    assert_eq!(get(&c, &gw.url("/missing")).await.0, 404);
    a.set_status(503);
    assert_eq!(get(&c, &gw.url("/broken")).await.0, 503);
    a.set_status(200);
    let backend = |s: &serde_json::Value| s["upstreams"][0]["backends"][0].clone();
    let b = backend(&status_json(&c, &gw).await);
    assert_eq!(b["responses"]["2xx"], 3, "{b}");
    assert_eq!(b["responses"]["4xx"], 1, "{b}");
    assert_eq!(b["responses"]["5xx"], 1, "{b}");
    assert_eq!(b["requests"]["error"], 1, "{b}");
    // The health check's result, its reason when it fails, and when the health changed.
    eventually(Duration::from_secs(5), "a passed check", || async {
        backend(&status_json(&c, &gw).await)["last_check"]["ok"] == true
    })
    .await;
    a.set_healthy(false);
    eventually(
        Duration::from_secs(5),
        "a failed check with its reason",
        || async {
            let b = backend(&status_json(&c, &gw).await);
            b["healthy"] == false
                && b["last_check"]["ok"] == false
                && b["last_check"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("503"))
                && b["health_since"].is_string()
                && b["last_check"]["latency_ms"].as_f64().is_some()
        },
    )
    .await;
}
