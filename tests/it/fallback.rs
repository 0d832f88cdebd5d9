//! Fallback routes: the primary answers when it can, without waiting for fallbacks; a
//! failing primary is replaced by the first successful fallback; all failing gives 502.

use std::time::{Duration, Instant};

use crate::common::*;

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
    let primary = Backend::start("primary").await;
    let (silent, received) = silent_listener().await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  primary: {{ backends: [{}], retries: 0 }}\n  fb0: {{ backends: [{silent}] }}\n\
         routes:\n  - name: conductor\n    match: {{ prefix: / }}\n    upstream: primary\n    fallback: [fb0]\n",
        primary.addr
    ));
    let c = client();
    for i in 0..5 {
        let started = Instant::now();
        let resp = c.get(gw.url(&format!("/q/{i}"))).send().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "held up {:?}",
            started.elapsed()
        );
        assert_eq!(resp.status(), 200);
        assert_eq!(answered_by(&resp), "primary");
        assert_eq!(resp.text().await.unwrap(), "primary");
    }
    // The fallback was sent every request too (at the same time); once the primary had
    // answered, the gateway stopped waiting for the fallback's answers.
    eventually(Duration::from_secs(5), "fallback copies", || async {
        let text = String::from_utf8_lossy(&received.lock().unwrap().concat()).into_owned();
        (0..5).all(|i| text.contains(&format!("GET /q/{i} HTTP/1.1")))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_over_the_limit_gets_413_at_once() {
    // The primary is down: its failure comes before the body is read, and the gateway
    // reads the rest for the fallbacks. Going over the limit then is still a 413, at once.
    let slow = Backend::start("slow").await;
    slow.set_delay(5_000);
    let dead = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(&conf(&dead, &[&slow], "    max_body_bytes: 1KiB\n"));
    // Chunked, so only the streaming count can catch it.
    let request = format!(
        "POST /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
        "x".repeat(2048)
    );
    let port = gw.port;
    let started = Instant::now();
    let (answer, _) = tokio::task::spawn_blocking(move || raw(port, request.as_bytes()))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "413 took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_copies_are_bounded_and_dropped_once_the_primary_answers() {
    let (primary, slow) = (
        Backend::start("primary").await,
        Backend::start("slow").await,
    );
    slow.set_delay(20_000);
    let gw = Gateway::start(&conf(
        &primary.addr.to_string(),
        &[&slow],
        "    fallback_max_inflight: 4\n",
    ));
    let c = client();
    // Each primary answer ends its fallback copy (the wait for the slow fallback's answer
    // stops): no copy holds a slot for 20 s, so ten requests in a row never run out of
    // the four slots.
    for i in 0..10 {
        let resp = c.get(gw.url(&format!("/seq/{i}"))).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let skipped = "fanout_fallback_skipped_total{route=\"conductor\"}";
    assert_eq!(metric(&c, &gw, skipped).await, 0);

    // A failing primary makes requests wait for the fallback: the fifth at once runs
    // without fallbacks (answered by the primary's 500) and is counted.
    let (primary, slow) = (
        Backend::start("primary").await,
        Backend::start("slow").await,
    );
    primary.set_status(500);
    slow.set_delay(1_000);
    let gw = Gateway::start(&conf(
        &primary.addr.to_string(),
        &[&slow],
        "    fallback_max_inflight: 4\n",
    ));
    let mut waiting = tokio::task::JoinSet::new();
    for i in 0..4 {
        let (c, url) = (c.clone(), gw.url(&format!("/wait/{i}")));
        waiting.spawn(async move { c.get(url).send().await.unwrap().status().as_u16() });
    }
    eventually(
        Duration::from_secs(5),
        "four fallback copies out",
        || async {
            slow.state
                .inflight
                .load(std::sync::atomic::Ordering::SeqCst)
                == 4
        },
    )
    .await;
    let resp = c.get(gw.url("/over")).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(metric(&c, &gw, skipped).await, 1);
    while let Some(status) = waiting.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
}
