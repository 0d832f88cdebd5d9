//! Route precedence and the gateway's own answers (404, 405, 502, 504), end to end.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_beats_prefix_and_host_beats_hostless() {
    let (exact, prefix, host, root) = (
        Backend::start("exact").await,
        Backend::start("prefix").await,
        Backend::start("host").await,
        Backend::start("root").await,
    );
    let gw = Gateway::start(&format!(
        "upstreams:\n  exact: {{ backends: [{}] }}\n  prefix: {{ backends: [{}] }}\n  host: {{ backends: [{}] }}\n  root: {{ backends: [{}] }}\n\
         routes:\n\
         \x20 - {{ match: {{ prefix: / }}, upstream: root }}\n\
         \x20 - {{ match: {{ prefix: /api }}, upstream: prefix }}\n\
         \x20 - {{ match: {{ path: /api/exact }}, upstream: exact }}\n\
         \x20 - {{ match: {{ prefix: /api, host: api.example.com }}, upstream: host }}\n",
        exact.addr, prefix.addr, host.addr, root.addr
    ));
    let c = client();
    let via = |path: &str, host: Option<&str>| {
        let mut req = c.get(gw.url(path));
        if let Some(h) = host {
            req = req.header("host", h);
        }
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.headers()["x-backend"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(via("/api/exact", None).await, "exact");
    assert_eq!(via("/api/exact/deeper", None).await, "prefix");
    assert_eq!(via("/api/users?id=1", None).await, "prefix");
    assert_eq!(via("/other", None).await, "root");
    assert_eq!(via("/api/exact", Some("api.example.com")).await, "host");
    assert_eq!(
        via("/api/users", Some("API.Example.com:8080")).await,
        "host"
    );
    assert_eq!(via("/web", Some("api.example.com")).await, "root");
    // The query string reaches the backend untouched.
    assert!(prefix.seen().iter().any(|s| s.path == "/api/users?id=1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_paths_and_methods_get_json_errors() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: /api, methods: [GET] }}, upstream: u }}\n",
        b.addr
    ));
    let c = client();
    let resp = c.get(gw.url("/nothing")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "no route");
    assert_eq!(body["request_id"], rid.as_str());

    let resp = c.delete(gw.url("/api/x")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    // Admin endpoints are not served on the proxy listener.
    assert_eq!(
        c.get(gw.url("/metrics")).send().await.unwrap().status(),
        404
    );
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_after_retries_is_502() {
    let dead = [free_port(), free_port()];
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ retries: 1, backends: [127.0.0.1:{}, 127.0.0.1:{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        dead[0], dead[1]
    ));
    let c = client();
    let resp = c.post(gw.url("/x")).body("payload").send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "upstream unavailable");
    // Both backends were tried once each: the retry went to the other one.
    let metrics = metrics_text(&c, &gw).await;
    for port in dead {
        let line = format!("fanout_upstream_requests_total{{backend=\"127.0.0.1:{port}\",outcome=\"error\",upstream=\"u\"}} 1");
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_retried_on_another_backend() {
    let live = Backend::start("live").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ retries: 1, backends: [127.0.0.1:{}, {}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        free_port(),
        live.addr
    ));
    let c = client();
    for _ in 0..20 {
        let resp = c
            .post(gw.url("/x"))
            .body("not idempotent, but never sent")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(live.hits(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gives_504() {
    let slow = Backend::start("slow").await;
    slow.set_delay(3000);
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ retries: 0, timeouts: {{ read: 300ms }}, backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        slow.addr
    ));
    let c = client();
    let started = std::time::Instant::now();
    let resp = c.get(gw.url("/slow")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "upstream timed out");
}
