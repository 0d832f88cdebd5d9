//! Overload: an upstream's adaptive concurrency limit sheds what it cannot serve within
//! `max_queue_wait` (503 + Retry-After, never sent upstream), serves what a freed slot
//! allows, and follows the upstream's latency.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

fn limited(backend: &Backend, concurrency: &str) -> Gateway {
    Gateway::start(&format!(
        "upstreams:\n  u: {{ backends: [{}], concurrency: {{ {concurrency} }} }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        backend.addr
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_a_request_waits_then_is_shed_and_never_reaches_the_upstream() {
    let slow = Backend::start("slow").await;
    slow.set_delay(1500);
    let gw = limited(&slow, "min: 2, max: 2, max_queue_wait: 100ms");
    let c = client();
    let held: Vec<_> = (0..2)
        .map(|i| {
            let (c, url) = (c.clone(), gw.url(&format!("/held/{i}")));
            tokio::spawn(async move { get(&c, &url).await.0 })
        })
        .collect();
    let s = &slow;
    eventually(
        Duration::from_secs(5),
        "both at the backend",
        || async move { s.hits() == 2 },
    )
    .await;

    let started = Instant::now();
    let resp = c.get(gw.url("/over")).send().await.expect("request");
    let waited = started.elapsed();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let body = resp.text().await.unwrap_or_default();
    assert!(body.contains("concurrency limit"), "{body}");
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_millis(1000),
        "shed after {waited:?}: it waits max_queue_wait, not for the upstream"
    );
    assert_eq!(slow.hits(), 2, "the shed request reached the upstream");

    for h in held {
        assert_eq!(h.await.expect("task"), 200);
    }
    assert_eq!(get(&c, &gw.url("/after")).await.0, 200);
    assert_eq!(slow.hits(), 3);
    let shed = "fanout_shed_total{reason=\"concurrency\",upstream=\"u\"}";
    assert_eq!(metric(&c, &gw, shed).await, 1);
    let limit = "fanout_upstream_concurrency_limit{upstream=\"u\"}";
    assert_eq!(metric(&c, &gw, limit).await, 2);
    let status = status_json(&c, &gw).await;
    assert_eq!(status["upstreams"][0]["concurrency"]["limit"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_limit_is_served_when_a_slot_frees_within_its_wait() {
    let b = Backend::start("b").await;
    b.set_delay(300);
    let gw = limited(&b, "min: 1, max: 1, max_queue_wait: 5s");
    let c = client();
    let started = Instant::now();
    let requests: Vec<_> = (0..3)
        .map(|i| {
            let (c, url) = (c.clone(), gw.url(&format!("/q/{i}")));
            tokio::spawn(async move { get(&c, &url).await.0 })
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.expect("task"), 200);
    }
    // One at a time: the three answers took three backend delays.
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert_eq!(b.hits(), 3);
    let shed = "fanout_shed_total{reason=\"concurrency\",upstream=\"u\"}";
    assert_eq!(metric(&c, &gw, shed).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_follows_the_upstreams_latency() {
    let b = Backend::start("b").await;
    b.set_delay(50);
    let gw = limited(&b, "min: 2, max: 500, max_queue_wait: 2s");
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..24)
        .map(|i| {
            let (c, url, stop) = (c.clone(), gw.url(&format!("/l/{i}")), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    let status = get(&c, &url).await.0;
                    assert!(status == 200 || status == 503, "{status}");
                }
            })
        })
        .collect();
    let limit = "fanout_upstream_concurrency_limit{upstream=\"u\"}";
    let (c2, gw2) = (&c, &gw);
    eventually(
        Duration::from_secs(15),
        "the limit rises over a fast upstream",
        || async move { metric(c2, gw2, limit).await >= 16 },
    )
    .await;
    b.set_delay(500);
    let slowed = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the limit falls when the upstream slows",
        || async move { metric(c2, gw2, limit).await <= 6 },
    )
    .await;
    eprintln!("the limit fell in {:?}", slowed.elapsed());
    stop.store(true, SeqCst);
    for t in load {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("a client stopped")
            .expect("client task");
    }
}
