//! The seeds' quick starts, one command each and no YAML: each tool's documented scenario
//! run through fanout's quick mode, against real backends. The Go reverse proxy (even
//! spread, a rate limit that answers 429, a stopped backend that costs no request), FanOut
//! (`POST /fanout` → 202, delivered to every target without the sensitive headers, a body
//! over `--max-body-size` → 413; configured from the environment as its users do),
//! go-conductor (the primary's answer, else the other's, else 502), and `--listen :PORT`.

use std::time::Duration;

use crate::common::*;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Quick mode on loopback `port` with the admin listener on `admin`, plus `extra`.
fn quick(port: u16, admin: u16, extra: &[&str]) -> Vec<String> {
    let mut all = args(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin",
        &format!("127.0.0.1:{admin}"),
    ]);
    all.extend(args(extra));
    all
}

fn url(b: &Backend) -> String {
    format!("http://{}", b.addr)
}

/// How many of `n` GETs each backend name answered, and how many were refused with 429.
async fn spread(gw: &Gateway, n: usize) -> (std::collections::BTreeMap<String, usize>, usize) {
    let c = client();
    let mut by_backend = std::collections::BTreeMap::new();
    let mut limited = 0;
    for i in 0..n {
        let (status, backend, _) = get(&c, &gw.url(&format!("/r/{i}"))).await;
        match status {
            200 => *by_backend.entry(backend).or_insert(0) += 1,
            429 => limited += 1,
            other => panic!("request {i}: {other}"),
        }
    }
    (by_backend, limited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_reverse_proxy_quick_start() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let backends = format!("{},{}", url(&a), url(&b));
    // Its flags, as its README writes them (fanout spells them with two dashes).
    let gw = Gateway::spawn_with(|port, admin| {
        quick(
            port,
            admin,
            &[
                "--backends",
                &backends,
                "--read-timeout",
                "5s",
                "--write-timeout",
                "10s",
            ],
        )
    });
    let (by_backend, limited) = spread(&gw, 20).await;
    assert_eq!(limited, 0);
    assert_eq!(by_backend.get("a"), Some(&10), "{by_backend:?}");
    assert_eq!(by_backend.get("b"), Some(&10), "{by_backend:?}");
    // A stopped backend costs no request: its failures go to the other one.
    b.kill();
    let (by_backend, _) = spread(&gw, 20).await;
    assert_eq!(by_backend.get("a"), Some(&20), "{by_backend:?}");

    // -rate-limit 20: 40 requests at once, the ones past the burst get 429.
    let gw = Gateway::spawn_with(|port, admin| {
        quick(port, admin, &["--backends", &url(&a), "--rate-limit", "20"])
    });
    let started = std::time::Instant::now();
    let (by_backend, limited) = spread(&gw, 40).await;
    // The burst (20), plus what the rate gave back while the requests ran.
    let refilled = (started.elapsed().as_secs_f64() * 20.0).ceil() as usize;
    let ok = by_backend.values().sum::<usize>();
    assert!(
        ok >= 20 && ok <= 20 + refilled + 1 && limited > 0,
        "{ok} answered, {limited} limited, {refilled} tokens refilled meanwhile"
    );
    assert_eq!(ok + limited, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanouts_quick_start_from_the_environment() {
    let (t1, t2) = (Backend::start("t1").await, Backend::start("t2").await);
    // FanOut's TARGETS are URLs; a path in one is where its deliveries go.
    let targets = format!("{}/hooks/one,{}", url(&t1), url(&t2));
    let gw = Gateway::spawn_env(
        |port, admin| {
            vec![
                ("FANOUT_LISTEN".into(), format!("127.0.0.1:{port}")),
                ("FANOUT_ADMIN".into(), format!("127.0.0.1:{admin}")),
                ("FANOUT_BROADCAST".into(), targets.clone()),
                ("FANOUT_PATH".into(), "/fanout".into()),
                ("FANOUT_MAX_BODY_SIZE".into(), "10MB".into()),
            ]
        },
        |_, _| Vec::new(),
    );
    let c = client();
    let resp = c
        .post(gw.url("/fanout"))
        .header("authorization", "Bearer secret")
        .header("x-api-key", "k")
        .header("x-kept", "yes")
        .body(r#"{"event":"signup"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["targets"], 2, "{answer}");
    let id = answer["request_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "both deliveries", || async {
        t1.hits() == 1 && t2.hits() == 1
    })
    .await;
    for (target, path) in [(&t1, "/hooks/one"), (&t2, "/fanout")] {
        let seen = &target.seen()[0];
        assert_eq!((seen.method.as_str(), seen.path.as_str()), ("POST", path));
        assert_eq!(&seen.body[..], br#"{"event":"signup"}"#);
        assert_eq!(seen.headers["x-request-id"], id.as_str());
        assert_eq!(seen.headers["x-kept"], "yes");
        assert!(
            !seen.headers.contains_key("authorization"),
            "{:?}",
            seen.headers
        );
        assert!(
            !seen.headers.contains_key("x-api-key"),
            "{:?}",
            seen.headers
        );
    }
    // 12 MB against MAX_BODY_SIZE 10MB: 413 on the declared length, before any of the body
    // is read (the head alone is sent: a client still writing its body when the answer
    // closes the connection may see the close before the answer), nothing delivered.
    let port = gw.port;
    let head = b"POST /fanout HTTP/1.1\r\nHost: a\r\nContent-Length: 12000000\r\n\r\n";
    let (answer, closed) = tokio::task::spawn_blocking(move || raw(port, head))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(closed);
    assert_eq!((t1.hits(), t2.hits()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_conductors_primary_and_others() {
    let (primary, other) = (
        Backend::start("primary").await,
        Backend::start("other").await,
    );
    let gw = Gateway::spawn_with(|port, admin| {
        quick(
            port,
            admin,
            &[
                "--backends",
                &url(&primary),
                "--fallback",
                &url(&other),
                "--connect-timeout",
                "500ms",
            ],
        )
    });
    let c = client();
    let answer = |path: &'static str| {
        let c = c.clone();
        let u = gw.url(path);
        async move {
            let resp = c.get(u).send().await.unwrap();
            let upstream = resp.headers()["x-fanout-upstream"]
                .to_str()
                .unwrap()
                .to_string();
            (resp.status().as_u16(), upstream, resp.text().await.unwrap())
        }
    };
    assert_eq!(
        answer("/a").await,
        (200, "backends".into(), "primary".into())
    );
    // (The other was asked at once too, but its copy is dropped as soon as the primary has
    // answered: whether it got there first is a race, so it is not counted here.)
    primary.kill();
    assert_eq!(
        answer("/b").await,
        (200, "fallback1".into(), "other".into())
    );
    other.kill();
    let resp = c.get(gw.url("/c")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_colon_port_takes_every_address() {
    let b = Backend::start("b").await;
    let gw = Gateway::spawn_with(|port, admin| {
        args(&[
            "--listen",
            &format!(":{port}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
            "--backends",
            &url(&b),
        ])
    });
    let c = client();
    let mut addresses = vec![
        format!("127.0.0.1:{}", gw.port),
        format!("127.0.0.2:{}", gw.port),
    ];
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        addresses.push(format!("[::1]:{}", gw.port));
    }
    for a in &addresses {
        let (status, backend, _) = get(&c, &format!("http://{a}/x")).await;
        assert_eq!((status, backend.as_str()), (200, "b"), "{a}");
    }
    // IPv4 clients keep their own addresses (the IPv6 socket is IPv6-only): no
    // IPv4-mapped ones in the log (nor in X-Forwarded-For and rate-limit keys).
    stdout_line(&gw, "\"host\":\"127.0.0.2:").await;
    let log = gw.stdout();
    assert_eq!(log.matches("\"client\":\"127.0.0.1\"").count(), 2, "{log}");
    assert!(!log.contains("::ffff:"), "{log}");
}

/// `fanout -t` with `env` and `args`: its exit status and what it printed.
fn check_with(env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(fanout_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_command_line_beats_the_environment() {
    let missing = "/nonexistent/fanout.yaml";
    let target = ("FANOUT_BROADCAST", "http://127.0.0.1:9/hook");
    // The image's default file gives way to quick mode asked for in the environment...
    let (ok, out) = check_with(&[("FANOUT_CONF", missing), target], &["-t"]);
    assert!(ok, "{out}");
    // ... and to quick mode on the command line.
    let (ok, out) = check_with(
        &[("FANOUT_CONF", missing)],
        &["-t", "--backends", "http://127.0.0.1:9"],
    );
    assert!(ok, "{out}");
    // A file named on the command line beats quick mode from the environment.
    let (ok, out) = check_with(&[target], &["-t", "-c", missing]);
    assert!(!ok && out.contains(missing), "{out}");
    // Both on the command line: refused, with the reason.
    let (ok, out) = check_with(
        &[],
        &["-t", "-c", missing, "--broadcast", "http://127.0.0.1:9"],
    );
    assert!(!ok && out.contains("choose one"), "{out}");
    // Bad values name their flag or variable.
    let (ok, out) = check_with(&[("FANOUT_READ_TIMEOUT", "5x"), target], &["-t"]);
    assert!(!ok && out.contains("--read-timeout"), "{out}");
    let (ok, out) = check_with(&[], &["-t", "--backends", "http://127.0.0.1:9/p"]);
    assert!(!ok && out.contains("takes no path"), "{out}");
    // --help shows each variable.
    let (_, help) = check_with(&[], &["--help"]);
    for var in [
        "FANOUT_CONF",
        "FANOUT_LISTEN",
        "FANOUT_BACKENDS",
        "FANOUT_BROADCAST",
        "FANOUT_FALLBACK",
        "FANOUT_PATH",
        "FANOUT_READ_TIMEOUT",
        "FANOUT_WRITE_TIMEOUT",
        "FANOUT_CONNECT_TIMEOUT",
        "FANOUT_MAX_BODY_SIZE",
        "FANOUT_REDACT_HEADERS",
        "FANOUT_RATE_LIMIT",
        "FANOUT_ADMIN",
    ] {
        assert!(
            help.contains(&format!("[env: {var}=")),
            "{var} missing from --help"
        );
    }
}
