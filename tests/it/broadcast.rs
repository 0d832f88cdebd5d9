//! Broadcast routes: 202 at once, every target gets every request with the same body, a
//! dead target hurts no other, and 500 targets work.

use std::time::{Duration, Instant};

use crate::common::*;

async fn broadcast_count(c: &reqwest::Client, gw: &Gateway, upstream: &str, outcome: &str) -> u64 {
    let series = format!("fanout_broadcast_deliveries_total{{outcome=\"{outcome}\",route=\"events\",upstream=\"{upstream}\"}}");
    metric(c, gw, &series).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_202_at_once_and_delivers_everywhere() {
    let (fast, slow) = (Backend::start("fast").await, Backend::start("slow").await);
    // The 202 must not wait for any target: it comes before the slow one could answer.
    let slow_answer = Duration::from_millis(1000);
    slow.set_delay(slow_answer.as_millis() as u64);
    let dead = free_port();
    let gw = Gateway::start(&format!(
        "upstreams:\n  audit: {{ backends: [{}] }}\n  analytics: {{ backends: [{}] }}\n  gone: {{ backends: [127.0.0.1:{dead}] }}\n\
         routes:\n  - name: events\n    match: {{ prefix: /events }}\n    broadcast: [audit, analytics, gone]\n",
        fast.addr, slow.addr
    ));
    let c = client();
    for i in 0..10 {
        let body = format!("{{\"event\": {i}, \"pad\": \"{}\"}}", "x".repeat(i * 100));
        let started = Instant::now();
        let resp = c
            .post(gw.url("/events/signup?src=web"))
            .header("authorization", "Bearer secret")
            .header("x-request-id", format!("ev-{i}"))
            .body(body)
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(resp.status(), 202);
        assert!(
            took < slow_answer,
            "202 took {took:?}: it waited for a target"
        );
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["request_id"], format!("ev-{i}"));
        assert_eq!(v["targets"], 3);
    }
    eventually(Duration::from_secs(15), "every delivery", || async {
        fast.hits() == 10 && slow.hits() == 10
    })
    .await;
    for b in [&fast, &slow] {
        let mut seen = b.seen();
        seen.sort_by_key(|s| s.headers["x-request-id"].to_str().unwrap().to_string());
        for s in &seen {
            let i: usize = s.headers["x-request-id"].to_str().unwrap()[3..]
                .parse()
                .unwrap();
            assert_eq!(
                s.body,
                format!("{{\"event\": {i}, \"pad\": \"{}\"}}", "x".repeat(i * 100)).as_bytes()
            );
            assert_eq!(
                (s.method.as_str(), s.path.as_str()),
                ("POST", "/events/signup?src=web")
            );
            assert!(
                s.headers.get("authorization").is_none(),
                "authorization reached a target"
            );
        }
    }
    // One Idempotency-Key per accepted request, the same for every target.
    let key = |b: &Backend, i: usize| {
        b.seen()
            .into_iter()
            .find(|s| s.headers["x-request-id"] == format!("ev-{i}").as_str())
            .map(|s| s.headers["idempotency-key"].clone())
            .expect("delivered with an Idempotency-Key")
    };
    for i in 0..10 {
        assert_eq!(key(&fast, i), key(&slow, i));
        if i > 0 {
            assert_ne!(key(&fast, i), key(&fast, i - 1));
        }
    }
    assert_eq!(broadcast_count(&c, &gw, "audit", "ok").await, 10);
    eventually(Duration::from_secs(5), "slow target counted", || async {
        broadcast_count(&c, &gw, "analytics", "ok").await == 10
    })
    .await;
    // The dead target's attempts fail and are retried (its circuit opens after 5 in a row
    // and holds the rest back); nothing is given up.
    eventually(
        Duration::from_secs(5),
        "dead target's failures counted",
        || async {
            broadcast_count(&c, &gw, "gone", "error").await >= 5
                && broadcast_count(&c, &gw, "gone", "retried").await >= 5
        },
    )
    .await;
    assert_eq!(broadcast_count(&c, &gw, "gone", "expired").await, 0);
    let status = status_json(&c, &gw).await;
    let gone = &status["routes"][0]["targets"][2];
    assert_eq!(gone["upstream"], "gone");
    assert_eq!(gone["pending"], 10, "{status}");
    assert!(gone["last_error"].as_str().is_some(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_targets_each_get_every_request() {
    let mut backends = Vec::new();
    for i in 0..50 {
        backends.push(Backend::start(&format!("b{i}")).await);
    }
    let mut upstreams = String::from("upstreams:\n");
    let mut names = Vec::new();
    for t in 0..500 {
        upstreams.push_str(&format!(
            "  t{t}: {{ backends: [{}] }}\n",
            backends[t % 50].addr
        ));
        names.push(format!("t{t}"));
    }
    let gw = Gateway::start(&format!(
        "{upstreams}routes:\n  - name: events\n    match: {{ prefix: / }}\n    broadcast: [{}]\n",
        names.join(", ")
    ));
    let c = client();
    for i in 0..4 {
        let resp = c
            .post(gw.url("/fan"))
            .body(format!("payload {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["targets"], 500);
    }
    // 4 requests × 500 targets, spread 10 targets per backend: 40 deliveries each.
    eventually(Duration::from_secs(20), "2000 deliveries", || async {
        backends.iter().all(|b| b.hits() == 40)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_bodies_respect_the_limit() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  t: {{ backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, broadcast: [t], max_body_bytes: 1KiB }}\n",
        b.addr
    ));
    let c = client();
    assert_eq!(
        c.post(gw.url("/e"))
            .body(vec![b'x'; 2048])
            .send()
            .await
            .unwrap()
            .status(),
        413
    );
    let (answer, closed) = raw(
        gw.port,
        format!("POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n", "y".repeat(2048)).as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(closed);
    // A request accepted after them is delivered: had the refused ones been, they would
    // have arrived first.
    let resp = c.post(gw.url("/after")).body("ok").send().await.unwrap();
    assert_eq!(resp.status(), 202);
    eventually(Duration::from_secs(5), "the later delivery", || async {
        b.hits() >= 1
    })
    .await;
    let paths: Vec<String> = b.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, vec!["/after".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_holds_at_most_its_byte_bound() {
    // A target that takes 10 s per delivery, and 5 MiB bodies: the 64 MiB a target may
    // hold fill after a dozen, long before its 1024-delivery queue would. Then the route
    // answers 503 (its only target is full) and memory stays bounded.
    let slow = Backend::start("slow").await;
    slow.set_delay(10_000);
    let gw = Gateway::start(&format!(
        "upstreams:\n  audit: {{ backends: [{}] }}\n\
         routes:\n  - name: events\n    match: {{ prefix: /events }}\n    broadcast: [audit]\n    \
         max_body_bytes: 10MiB\n",
        slow.addr
    ));
    let c = client();
    let body = vec![b'x'; 5 * 1024 * 1024];
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..20 {
        let resp = c
            .post(gw.url("/events"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            202 => accepted += 1,
            503 => {
                assert_eq!(resp.headers()["retry-after"], "1");
                refused += 1;
            }
            other => panic!("status {other}"),
        }
    }
    assert!((10..=13).contains(&accepted), "{accepted} accepted");
    assert_eq!(accepted + refused, 20);
}
