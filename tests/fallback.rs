//! Fallback routes: the primary answers when it can, without waiting for fallbacks; a
//! failing primary is replaced by the first successful fallback; all failing gives 502.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn conf(primary: &str, fallbacks: &[&Backend], extra: &str) -> String {
    let mut ups = format!("upstreams:\n  primary: {{ backends: [{primary}], retries: 0 }}\n");
    let mut names = Vec::new();
    for (i, b) in fallbacks.iter().enumerate() {
        ups.push_str(&format!("  fb{i}: {{ backends: [{}] }}\n", b.addr));
        names.push(format!("fb{i}"));
    }
    format!(
        "{ups}routes:\n  - name: conductor\n    match: {{ prefix: / }}\n    upstream: primary\n    fallback: [{}]\n{extra}",
        names.join(", ")
    )
}

fn answered_by(resp: &reqwest::Response) -> String {
    resp.headers()["x-fanout-upstream"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_fast_primary_answers_without_waiting() {
    let (primary, slow) = (
        Backend::start("primary").await,
        Backend::start("slow-fallback").await,
    );
    slow.set_delay(1000);
    let gw = Gateway::start(&conf(&primary.addr.to_string(), &[&slow], ""));
    let c = client();
    for _ in 0..5 {
        let started = Instant::now();
        let resp = c.get(gw.url("/q")).send().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "held up {:?}",
            started.elapsed()
        );
        assert_eq!(resp.status(), 200);
        assert_eq!(answered_by(&resp), "primary");
        assert_eq!(resp.text().await.unwrap(), "primary");
    }
    // The fallback received the requests too (sent at the same time), answers discarded.
    eventually(Duration::from_secs(5), "fallback copies", || async {
        slow.hits() == 5
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_primary_is_replaced_by_the_first_successful_fallback() {
    let (primary, broken, good) = (
        Backend::start("primary").await,
        Backend::start("broken").await,
        Backend::start("good").await,
    );
    primary.set_status(500);
    broken.set_status(503);
    let gw = Gateway::start(&conf(&primary.addr.to_string(), &[&broken, &good], ""));
    let c = client();
    let resp = c
        .post(gw.url("/order"))
        .body("the order")
        .header("x-request-id", "fb-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(answered_by(&resp), "fb1");
    assert_eq!(resp.headers()["x-request-id"], "fb-1");
    assert_eq!(resp.text().await.unwrap(), "good");
    assert_eq!(good.seen()[0].body, "the order".as_bytes());
    let line = stdout_line(&gw, "fb-1").await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["upstream"], "fb1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_falls_back_with_the_whole_body() {
    let good = Backend::start("good").await;
    let dead = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(&conf(&dead, &[&good], ""));
    let c = client();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let resp = c
        .put(gw.url("/doc"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(answered_by(&resp), "fb0");
    assert!(
        good.seen()[0].body == body,
        "the fallback got a different body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_failing_gives_502_and_oversized_fallback_answers_count_as_failures() {
    let (primary, fb) = (Backend::start("primary").await, Backend::start("fb").await);
    primary.set_status(500);
    fb.set_status(502);
    let gw = Gateway::start(&conf(&primary.addr.to_string(), &[&fb], ""));
    let c = client();
    let resp = c.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "every upstream failed");

    // A fallback answer larger than fallback_max_body is a failure too.
    let big = Backend::start("a-name-longer-than-eight-bytes").await;
    let gw = Gateway::start(&conf(
        &primary.addr.to_string(),
        &[&big],
        "    fallback_max_body: 8\n",
    ));
    let resp = c.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
}
