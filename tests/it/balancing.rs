//! Load-balancing algorithms, observed from real backends behind a real gateway.

use std::collections::HashMap;
use std::sync::Arc;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_splits_exactly_in_half() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ balance: round_robin, backends: [{}, {}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        a.addr, b.addr
    ));
    let c = client();
    for i in 0..200 {
        let (status, _, _) = get(&c, &gw.url(&format!("/rr/{i}"))).await;
        assert_eq!(status, 200);
    }
    assert_eq!((a.hits(), b.hits()), (100, 100));
}

/// Sends `n` sequential requests and returns the answering backends in order.
async fn sequence(gw: &Gateway, n: usize) -> Vec<String> {
    let c = client();
    let mut order = Vec::new();
    for _ in 0..n {
        let (status, backend, _) = get(&c, &gw.url("/w")).await;
        assert_eq!(status, 200);
        order.push(backend);
    }
    order
}

fn longest_run(order: &[String], name: &str) -> usize {
    order
        .split(|b| b != name)
        .map(|run| run.len())
        .max()
        .unwrap_or(0)
}

fn weighted_conf(a: &Backend, wa: u32, b: &Backend, wb: u32) -> String {
    format!(
        "upstreams:\n  u:\n    balance: weighted\n    backends:\n      - {{ address: {}, weight: {wa} }}\n      - {{ address: {}, weight: {wb} }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        a.addr, b.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_is_proportional_and_smooth() {
    let (light, heavy) = (Backend::start("light").await, Backend::start("heavy").await);
    let gw = Gateway::start(&weighted_conf(&light, 1, &heavy, 5));
    let order = sequence(&gw, 600).await;
    let heavy_share = order.iter().filter(|b| *b == "heavy").count() as f64 / order.len() as f64;
    assert!(
        (heavy_share - 5.0 / 6.0).abs() <= 0.1 * 5.0 / 6.0,
        "heavy share {heavy_share}"
    );
    // Smooth: the light backend is spread out, once in every six picks, never bunched.
    for window in order.windows(6) {
        assert_eq!(
            window.iter().filter(|b| *b == "light").count(),
            1,
            "{window:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_interleaves_instead_of_bursting() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = Gateway::start(&weighted_conf(&a, 2, &b, 3));
    let order = sequence(&gw, 100).await;
    assert_eq!((a.hits(), b.hits()), (40, 60));
    // Bursty weighted round-robin gives a a b b b; smooth gives b a b a b.
    assert!(
        longest_run(&order, "a") <= 1 && longest_run(&order, "b") <= 2,
        "{order:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_favours_the_fast_backend() {
    let (fast, slow) = (Backend::start("fast").await, Backend::start("slow").await);
    slow.set_delay(200);
    let gw = Arc::new(Gateway::start(&format!(
        "upstreams:\n  u: {{ balance: least_conn, backends: [{}, {}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        fast.addr, slow.addr
    )));
    let c = client();
    let mut workers = Vec::new();
    for _ in 0..10 {
        let (c, url) = (c.clone(), gw.url("/lc"));
        workers.push(tokio::spawn(async move {
            for _ in 0..20 {
                let (status, _, _) = get(&c, &url).await;
                assert_eq!(status, 200);
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    let total = (fast.hits() + slow.hits()) as f64;
    assert_eq!(total, 200.0);
    assert!(
        fast.hits() as f64 / total >= 0.75,
        "fast {} slow {}",
        fast.hits(),
        slow.hits()
    );
    // Every in-flight slot was released.
    let status: serde_json::Value = status_json(&c, &gw).await;
    for b in status["upstreams"][0]["backends"].as_array().unwrap() {
        assert_eq!(b["inflight"], 0, "{b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_each_key_on_one_backend() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    balance: consistent_hash\n    hash_key: header:X-User-Id\n    backends: [{}, {}, {}]\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        backends[0].addr, backends[1].addr, backends[2].addr
    ));
    let c = client();
    let mut owner: HashMap<String, String> = HashMap::new();
    for round in 0..4 {
        for user in 0..60 {
            let resp = c
                .get(gw.url("/cart"))
                .header("X-User-Id", format!("user-{user}"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let backend = resp.headers()["x-backend"].to_str().unwrap().to_string();
            let first = owner
                .entry(format!("user-{user}"))
                .or_insert_with(|| backend.clone());
            assert_eq!(*first, backend, "user-{user} moved in round {round}");
        }
    }
    for b in &backends {
        assert!(b.hits() > 0, "backend {} got no key", b.state.name);
    }
}
