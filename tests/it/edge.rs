//! The gateway's edge: forwarding headers, request ids, header rules, body limits,
//! malformed requests, the access log, quick mode and the demo.

use crate::common::*;

fn conf(b: &Backend, extra_route: &str) -> String {
    format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - match: {{ prefix: / }}\n    upstream: u\n    max_body_bytes: 1KiB\n{extra_route}",
        b.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_reach_the_backend_and_hop_by_hop_ones_do_not() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&conf(&b, ""));
    let request = "GET /fwd HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 203.0.113.7\r\n\
                   Connection: X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
                   Upgrade: h2c\r\nProxy-Authorization: Basic eA==\r\nX-Kept: yes\r\n\r\n";
    let (answer, _) = raw(gw.port, request.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = &b.seen()[0];
    let h = |n: &str| seen.headers.get(n).map(|v| v.to_str().unwrap().to_string());
    // No trusted proxy: the client-written chain is not believed, nor passed on.
    assert_eq!(h("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(h("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(h("host").as_deref(), Some("example.com"));
    assert_eq!(h("x-kept").as_deref(), Some("yes"));
    for gone in [
        "x-secret",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        assert_eq!(h(gone), None, "{gone} was forwarded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_kept_generated_and_returned() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&conf(&b, ""));
    let c = client();
    let id_of =
        |resp: &reqwest::Response| resp.headers()["x-request-id"].to_str().unwrap().to_string();

    let resp = c
        .get(gw.url("/a"))
        .header("x-request-id", "client-id-42")
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(&resp), "client-id-42");
    let resp = c.get(gw.url("/b")).send().await.unwrap();
    let generated = id_of(&resp);
    assert_eq!(generated.len(), 32);
    assert!(generated.bytes().all(|c| c.is_ascii_hexdigit()));
    let resp = c
        .get(gw.url("/c"))
        .header("x-request-id", "not ok")
        .send()
        .await
        .unwrap();
    let replaced = id_of(&resp);
    assert_ne!(replaced, "not ok");
    let too_long = "x".repeat(129);
    let resp = c
        .get(gw.url("/d"))
        .header("x-request-id", too_long.as_str())
        .send()
        .await
        .unwrap();
    assert_ne!(id_of(&resp), too_long);

    let upstream_ids: Vec<String> = b
        .seen()
        .iter()
        .map(|s| s.headers["x-request-id"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(upstream_ids[0], "client-id-42");
    assert_eq!(upstream_ids[1], generated);
    assert_eq!(upstream_ids[2], replaced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rules_and_strip_prefix_apply() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - match: {{ prefix: /api }}\n    upstream: u\n    strip_prefix: true\n    \
         request_headers: {{ set: {{ X-Proxy-Service: api }}, remove: [X-Debug] }}\n    \
         response_headers: {{ set: {{ X-Frame-Options: DENY }}, remove: [X-Backend] }}\n",
        b.addr
    ));
    let c = client();
    let resp = c
        .get(gw.url("/api/users?id=7"))
        .header("X-Debug", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    assert!(resp.headers().get("x-backend").is_none());
    let resp = c.get(gw.url("/api")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = b.seen();
    assert_eq!(seen[0].path, "/users?id=7");
    assert_eq!(seen[0].headers["x-proxy-service"], "api");
    assert!(seen[0].headers.get("x-debug").is_none());
    assert_eq!(seen[1].path, "/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_and_never_reach_the_backend() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&conf(&b, ""));
    let c = client();
    // Declared length over the limit: refused before anything goes upstream.
    let resp = c
        .post(gw.url("/big"))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "request body too large");
    // Within the limit: passes.
    let resp = c
        .post(gw.url("/small"))
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(b.seen()[0].body.len(), 1024);

    // Chunked, growing past the limit while streaming: 413, the upstream request aborted.
    let mut req =
        b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'y'; 512]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (answer, closed) = raw(gw.port, &req);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request body too large"), "{answer}");
    assert!(closed, "connection left open after a refused body");
    // A request sent after it arrives: the refused one would have arrived before.
    assert_eq!(get(&c, &gw.url("/after")).await.0, 200);
    let seen: Vec<(String, usize)> = b
        .seen()
        .iter()
        .map(|s| (s.path.clone(), s.body.len()))
        .collect();
    assert_eq!(b.hits(), 2, "the backend received a refused body: {seen:?}");
    assert_eq!(seen[1].0, "/after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_a_closed_connection() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&conf(&b, ""));
    let cases: [(&str, &str); 6] = [
        ("bad request line", "GARBAGE\r\n\r\n"),
        ("invalid header name", "GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"),
        (
            "Content-Length and Transfer-Encoding",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "differing Content-Lengths",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        ("non-numeric Content-Length", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nhello"),
        ("unknown Transfer-Encoding", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello"),
    ];
    for (name, request) in cases {
        let (answer, closed) = raw(gw.port, request.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400"), "{name}: {answer}");
        assert!(closed, "{name}: connection not closed");
    }
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_one_json_line_per_request() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - {{ name: logged, match: {{ prefix: /log }}, upstream: u }}\n  \
         - {{ match: {{ prefix: /quiet }}, upstream: u, access_log: off }}\n",
        b.addr
    ));
    let c = client();
    let resp = c
        .post(gw.url("/log/me?q=1"))
        .header("host", "logs.example.com")
        .header("x-request-id", "log-line-1")
        .body("12345")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    c.get(gw.url("/quiet"))
        .header("x-request-id", "quiet-1")
        .send()
        .await
        .unwrap();
    c.get(gw.url("/missing"))
        .header("x-request-id", "missing-1")
        .send()
        .await
        .unwrap();

    let line = stdout_line(&gw, "log-line-1").await;
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    assert_eq!(v["request_id"], "log-line-1");
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["host"], "logs.example.com");
    assert_eq!(v["path"], "/log/me");
    assert_eq!(v["status"], 200);
    assert_eq!(v["route"], "logged");
    assert_eq!(v["upstream"], "u");
    assert_eq!(v["backend"], b.addr.to_string());
    assert_eq!(v["bytes_in"], 5);
    assert_eq!(v["bytes_out"], 1);
    assert!(v["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(v["ts"].as_str().unwrap().ends_with('Z'));

    let missing = stdout_line(&gw, "missing-1").await;
    let v: serde_json::Value = serde_json::from_str(&missing).unwrap();
    assert_eq!(v["status"], 404);
    assert_eq!(v["route"], serde_json::Value::Null);
    assert!(
        !gw.stdout().contains("quiet-1"),
        "access_log: off still logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_balances_over_its_backends() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = Gateway::spawn_with(|port, admin| {
        vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--backends".into(),
            format!("http://{},http://{}", a.addr, b.addr),
            "--balance".into(),
            "round_robin".into(),
            "--admin".into(),
            format!("127.0.0.1:{admin}"),
        ]
    });
    let c = client();
    for _ in 0..10 {
        assert_eq!(get(&c, &gw.url("/anything")).await.0, 200);
    }
    assert_eq!((a.hits(), b.hits()), (5, 5));

    let out = std::process::Command::new(fanout_bin())
        .args([
            "--listen",
            "127.0.0.1:1",
            "--backends",
            "http://127.0.0.1:2",
            "--balance",
            "fastest",
            "-t",
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`fastest` is not one of"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_answers_its_own_printed_commands() {
    let gw = Gateway::demo();
    let line = stdout_line(&gw, "/api/hello").await;
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a URL in the printed command");
    let c = client();
    let resp = c.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(v["backend"].as_str().unwrap().starts_with("api-"), "{v}");

    // The broadcast route answers 202 at once.
    let events = stdout_line(&gw, "/events").await;
    let events_url = events
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap();
    let resp = c
        .post(events_url)
        .body("{\"event\":\"signup\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["targets"], 2);

    let status_line = stdout_line(&gw, "/status").await;
    let status_url = status_line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap();
    let status = c.get(status_url).send().await.unwrap();
    assert_eq!(status.status(), 200);
}
