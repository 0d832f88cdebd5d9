//! Active health checks: a failing backend leaves the rotation without any client seeing
//! an error, and comes back; with every backend down the route answers 503.

use std::time::Duration;

use crate::common::*;

fn conf(a: &Backend, b: &Backend) -> String {
    format!(
        "upstreams:\n  u:\n    backends: [{}, {}]\n    retries: 1\n    health_check: {{ type: http, path: /health, interval: 100ms, timeout: 500ms, healthy_after: 2, unhealthy_after: 2 }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        a.addr, b.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backend_leaves_and_returns() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = Gateway::start(&conf(&a, &b));
    let c = client();
    for _ in 0..10 {
        assert_eq!(get(&c, &gw.url("/x")).await.0, 200);
    }
    assert!(b.hits() > 0);

    b.set_healthy(false);
    // Within interval × unhealthy_after (plus a probe's time), b is out; clients see no error.
    eventually(Duration::from_secs(5), "b marked unhealthy", || async {
        let s: serde_json::Value = status_json(&c, &gw).await;
        s["upstreams"][0]["backends"][1]["healthy"] == false
    })
    .await;
    let before = b.hits();
    for _ in 0..50 {
        assert_eq!(get(&c, &gw.url("/x")).await.0, 200);
    }
    assert_eq!(b.hits(), before, "an unhealthy backend still got requests");

    b.set_healthy(true);
    eventually(Duration::from_secs(5), "b back in rotation", || async {
        get(&c, &gw.url("/x")).await;
        b.hits() > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_costs_clients_nothing() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = Gateway::start(&conf(&a, &b));
    let c = client();
    b.kill();
    // Before the health check notices, retries send each request to the live backend.
    for _ in 0..100 {
        let (status, backend, _) = get(&c, &gw.url("/x")).await;
        assert_eq!((status, backend.as_str()), (200, "a"));
    }
    eventually(
        Duration::from_secs(5),
        "dead backend marked unhealthy",
        || async {
            let s: serde_json::Value = status_json(&c, &gw).await;
            s["upstreams"][0]["backends"][1]["healthy"] == false
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_backend_gives_503_and_not_ready() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = Gateway::start(&conf(&a, &b));
    let c = client();
    assert_eq!(
        c.get(gw.admin_url("/ready")).send().await.unwrap().status(),
        200
    );
    a.set_healthy(false);
    b.set_healthy(false);
    eventually(Duration::from_secs(5), "route answers 503", || async {
        get(&c, &gw.url("/x")).await.0 == 503
    })
    .await;
    let resp = c
        .get(gw.url("/x"))
        .header("x-request-id", "req-503")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["request_id"], "req-503");
    assert_eq!(body["error"], "no healthy backend");
    let ready = c.get(gw.admin_url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["upstreams_without_healthy_backend"][0], "u");
}
