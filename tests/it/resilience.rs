//! Resilience: retries around dead backends, passive circuit breakers, rate limits, and
//! never retrying a request whose body was sent.

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_backend_of_two_costs_no_request() {
    let live = Backend::start("live").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ retries: 1, backends: [127.0.0.1:{}, {}], breaker: {{ failures: 5, open: 10s }} }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        free_port(),
        live.addr
    ));
    let c = client();
    for _ in 0..100 {
        assert_eq!(get(&c, &gw.url("/x")).await.0, 200);
    }
    assert_eq!(live.hits(), 100);
    let s = status_json(&c, &gw).await;
    assert_eq!(s["upstreams"][0]["backends"][0]["circuit"], "open");
    let metrics = metrics_text(&c, &gw).await;
    assert!(
        metrics.contains("fanout_upstream_retries_total{upstream=\"u\"} 5"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_refuses_connects_is_ejected_by_default_and_logged_once() {
    // No `breaker:`: passive ejection after 3 failed connects in a row, for 10 s.
    let live = Backend::start("live").await;
    let dead = free_port();
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ retries: 1, backends: [127.0.0.1:{dead}, {}] }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        live.addr
    ));
    let c = client();
    for _ in 0..100 {
        assert_eq!(get(&c, &gw.url("/x")).await.0, 200);
    }
    assert_eq!(live.hits(), 100);
    let dialled = format!(
        "fanout_upstream_requests_total{{backend=\"127.0.0.1:{dead}\",outcome=\"error\",upstream=\"u\"}}"
    );
    assert_eq!(
        metric(&c, &gw, &dialled).await,
        3,
        "dialled after its ejection"
    );
    let open = format!("fanout_circuit_open{{backend=\"127.0.0.1:{dead}\",upstream=\"u\"}}");
    assert_eq!(metric(&c, &gw, &open).await, 1);
    let s = status_json(&c, &gw).await;
    assert_eq!(s["upstreams"][0]["backends"][0]["circuit"], "open");
    // One line for the ejection; none per failed attempt (the retries answered them).
    let log = gw.stderr();
    assert_eq!(log.matches("taken out for").count(), 1, "{log}");
    assert!(!log.contains("Fail to proxy"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_mirror_is_ejected_and_its_copies_are_not_dialled() {
    let primary = Backend::start("primary").await;
    let dead = free_port();
    let gw = Gateway::start(&format!(
        "upstreams:\n  p: {{ backends: [{}] }}\n  shadow: {{ backends: [127.0.0.1:{dead}] }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: p, mirror: [{{ upstream: shadow }}] }}\n",
        primary.addr
    ));
    let c = client();
    for _ in 0..50 {
        assert_eq!(get(&c, &gw.url("/x")).await.0, 200);
    }
    let errors =
        "fanout_mirror_requests_total{outcome=\"error\",route=\"prefix:/\",upstream=\"shadow\"}";
    let (c2, gw2) = (&c, &gw);
    eventually(
        Duration::from_secs(5),
        "every copy counted",
        || async move { metric(c2, gw2, errors).await == 50 },
    )
    .await;
    let dialled = format!(
        "fanout_upstream_requests_total{{backend=\"127.0.0.1:{dead}\",outcome=\"error\",upstream=\"shadow\"}}"
    );
    assert!(
        metric(&c, &gw, &dialled).await <= 3,
        "the dead mirror kept being dialled"
    );
    let log = gw.stderr();
    assert_eq!(log.matches("taken out for").count(), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_opens_probes_doubles_and_closes() {
    let (bad, good) = (Backend::start("bad").await, Backend::start("good").await);
    bad.set_status(500);
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ backends: [{}, {}], breaker: {{ failures: 3, open: 1s, max_open: 8s }} }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        bad.addr, good.addr
    ));
    let c = client();
    let started = Instant::now();
    for _ in 0..100 {
        get(&c, &gw.url("/x")).await;
    }
    // Opened after 3 failures; at most one probe if the second of `open` already passed.
    let allowed = if started.elapsed() < Duration::from_secs(1) {
        3
    } else {
        4
    };
    assert!(
        bad.hits() <= allowed,
        "the failing backend got {} requests",
        bad.hits()
    );
    assert_eq!(
        status_json(&c, &gw).await["upstreams"][0]["backends"][0]["circuit"],
        "open"
    );
    let metrics = metrics_text(&c, &gw).await;
    assert!(metrics.contains(&format!(
        "fanout_circuit_open{{backend=\"{}\",upstream=\"u\"}} 1",
        bad.addr
    )));

    // Keep traffic flowing and time the probes: the open period doubles after a failed one.
    let probe_after = |n: usize| {
        let (c, url, bad) = (c.clone(), gw.url("/x"), &bad);
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while bad.hits() < n {
                assert!(Instant::now() < deadline, "no probe number {n}");
                let (status, _, _) = get(&c, &url).await;
                assert!(status == 200 || status == 500);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Instant::now()
        }
    };
    let h = bad.hits();
    let first = probe_after(h + 1).await;
    let second = probe_after(h + 2).await;
    let gap = second - first;
    assert!(
        gap >= Duration::from_millis(1800) && gap < Duration::from_millis(3500),
        "second probe after {gap:?}"
    );

    // Recovered: the next probe succeeds and the backend is back in rotation.
    bad.set_status(200);
    probe_after(h + 3).await;
    let before = bad.hits();
    for _ in 0..20 {
        assert_eq!(get(&c, &gw.url("/x")).await.0, 200);
    }
    assert!(
        bad.hits() - before >= 8,
        "recovered backend got {} of 20",
        bad.hits() - before
    );
    assert_eq!(
        status_json(&c, &gw).await["upstreams"][0]["backends"][0]["circuit"],
        "closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_allows_burst_plus_rate_and_answers_429() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - name: limited\n    match: {{ prefix: / }}\n    upstream: u\n    \
         rate_limit: {{ requests_per_second: 50, burst: 10, key: client_ip }}\n",
        b.addr
    ));
    let c = client();
    let started = Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    while started.elapsed() < Duration::from_secs(2) {
        let resp = c.get(gw.url("/r")).send().await.unwrap();
        match resp.status().as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                if limited == 1 {
                    assert_eq!(resp.headers()["retry-after"], "1");
                    assert_eq!(resp.headers()["x-ratelimit-limit"], "50");
                    assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
                    let body: serde_json::Value = resp.json().await.unwrap();
                    assert_eq!(body["error"], "rate limit exceeded");
                }
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = 10.0 + 50.0 * elapsed;
    assert!(
        (ok as f64) >= expected * 0.85 && (ok as f64) <= expected * 1.1,
        "{ok} allowed, expected ≈ {expected:.0}"
    );
    assert!(limited > 0);
    assert_eq!(b.hits() as u32, ok);
    let metrics = metrics_text(&c, &gw).await;
    assert!(
        metrics.contains(&format!(
            "fanout_rate_limited_total{{route=\"limited\"}} {limited}"
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_limit_is_shared_by_concurrent_clients() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - name: shared\n    \
         match: {{ prefix: / }}\n    upstream: u\n    \
         rate_limit: {{ requests_per_second: 100, burst: 20, key: global }}\n",
        b.addr
    ));
    let started = Instant::now();
    // Eight clients, each on connections of its own, all drawing from the one bucket.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (c, url) = (client(), gw.url("/g"));
            tokio::spawn(async move {
                let (mut ok, mut limited) = (0u64, 0u64);
                while started.elapsed() < Duration::from_secs(2) {
                    match c.get(&url).send().await.unwrap().status().as_u16() {
                        200 => ok += 1,
                        429 => limited += 1,
                        other => panic!("unexpected status {other}"),
                    }
                }
                (ok, limited)
            })
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for c in clients {
        let (o, l) = c.await.unwrap();
        ok += o;
        limited += l;
    }
    let expected = 20.0 + 100.0 * started.elapsed().as_secs_f64();
    assert!(
        (ok as f64) >= expected * 0.85 && (ok as f64) <= expected * 1.05,
        "{ok} allowed, expected ≈ {expected:.0}"
    );
    assert!(limited > 0);
    assert_eq!(b.hits() as u64, ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_keys_are_limited_independently() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - match: {{ prefix: / }}\n    upstream: u\n    \
         rate_limit: {{ requests_per_second: 0.5, burst: 2, key: header:X-Api-Key }}\n",
        b.addr
    ));
    let c = client();
    let mut by_key = Vec::new();
    for key in ["alice", "bob", "carol"] {
        let mut answers = Vec::new();
        for _ in 0..4 {
            let resp = c
                .get(gw.url("/k"))
                .header("x-api-key", key)
                .send()
                .await
                .unwrap();
            let remaining = resp.headers()["x-ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_string();
            assert_eq!(resp.headers()["x-ratelimit-limit"], "0.5");
            answers.push((resp.status().as_u16(), remaining));
        }
        by_key.push(answers);
    }
    // Each key's bucket holds two tokens: the allowed answers count them down.
    let expected: Vec<(u16, String)> = [(200, "1"), (200, "0"), (429, "0"), (429, "0")]
        .iter()
        .map(|(s, r)| (*s, r.to_string()))
        .collect();
    for answers in by_key {
        assert_eq!(answers, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_was_sent_is_retried_only_if_idempotent() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    a.state.drop_after_body.store(true, SeqCst);
    b.state.drop_after_body.store(true, SeqCst);
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ retries: 1, backends: [{}, {}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        a.addr, b.addr
    ));
    let c = client();
    let resp = c
        .post(gw.url("/order"))
        .body("charge the card once")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(a.hits() + b.hits(), 1, "a POST was sent twice");

    let resp = c
        .put(gw.url("/doc"))
        .body("idempotent")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(
        a.hits() + b.hits(),
        3,
        "the PUT was not retried on the other backend"
    );
}

/// Two PUTs of 60 kB under a 100 kB limit on `u` (backend `a` closes after reading each
/// body, `b` answers): with round robin one of them meets `a` first and is retried on `b`.
/// The retry replays the body: it must count once against the limit.
async fn put_twice_through_a_closing_backend(route_extra: &str) -> (Backend, Backend, Gateway) {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    a.state.drop_after_body.store(true, SeqCst);
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ retries: 1, backends: [{}, {}] }}\n{route_extra}",
        a.addr, b.addr
    ));
    let c = client();
    let body = vec![b'x'; 60_000];
    for _ in 0..2 {
        let resp = c
            .put(gw.url("/doc"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "a retried 60 kB body refused");
        assert_eq!(resp.headers()["x-backend"], "b");
    }
    assert!(a.hits() >= 1, "no request met the closing backend first");
    assert!(b.seen().iter().all(|s| s.body.len() == 60_000));
    (a, b, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_body_counts_once_and_reaches_a_mirror_once() {
    let shadow = Backend::start("shadow").await;
    let (_a, _b, gw) = put_twice_through_a_closing_backend(&format!(
        "  shadow: {{ backends: [{}] }}\nroutes:\n  - match: {{ prefix: / }}\n    upstream: u\n    \
         max_body_bytes: 100kB\n    mirror: [{{ upstream: shadow }}]\n",
        shadow.addr
    ))
    .await;
    let c = client();
    eventually(Duration::from_secs(5), "both copies arrived", || async {
        shadow.hits() == 2
    })
    .await;
    for s in shadow.seen() {
        assert_eq!(s.body.len(), 60_000, "a mirror copy got the replayed bytes");
    }
    // The shadow counts a copy when it has read it; the gateway when the answer is back.
    let series =
        "fanout_mirror_requests_total{outcome=\"ok\",route=\"prefix:/\",upstream=\"shadow\"}";
    eventually(Duration::from_secs(5), "both copies counted ok", || async {
        metric(&c, &gw, series).await == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_body_reaches_a_fallback_once() {
    // The fallback never answers: what it was sent is all there is to see.
    let (fb, received) = silent_listener().await;
    let (_a, b, _gw) = put_twice_through_a_closing_backend(&format!(
        "  fb: {{ backends: [{fb}] }}\nroutes:\n  - match: {{ prefix: / }}\n    upstream: u\n    \
         max_body_bytes: 100kB\n    fallback: [fb]\n"
    ))
    .await;
    assert_eq!(b.seen().len(), 2);
    // Each copy's body is one run of 60,000 `x` on its own connection: a replay would
    // make a longer run.
    let runs = || {
        let mut runs = Vec::new();
        for bytes in received.lock().unwrap().iter() {
            runs.extend(
                bytes
                    .split(|&c| c != b'x')
                    .map(<[u8]>::len)
                    .filter(|&n| n > 100),
            );
        }
        runs
    };
    eventually(
        Duration::from_secs(5),
        "both fallback copies sent",
        || async { runs().iter().sum::<usize>() >= 120_000 },
    )
    .await;
    assert_eq!(
        runs(),
        vec![60_000, 60_000],
        "a fallback copy got the replayed bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_budget_caps_the_retries_of_a_failing_upstream() {
    // Half the requests land on a backend that refuses connects (its breaker never opens
    // here), so without a budget each of those is retried; with `retry_budget: 20%` and one
    // request at a time, only the floor of 3 retries a second is allowed.
    let live = Backend::start("live").await;
    let dead = free_port();
    let conf = |budget: &str| {
        format!(
            "upstreams:\n  u: {{ retries: 2, {budget}backends: [127.0.0.1:{dead}, {}], \
             breaker: {{ failures: 100000, open: 10s }} }}\n\
             routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
            live.addr
        )
    };
    let c = client();
    let run = |gw: Gateway| {
        let c = c.clone();
        async move {
            let started = Instant::now();
            let mut ok = 0;
            for _ in 0..100 {
                let status = get(&c, &gw.url("/x")).await.0;
                assert!(status == 200 || status == 502, "{status}");
                ok += usize::from(status == 200);
            }
            let elapsed = started.elapsed().as_secs_f64();
            let retries = metric(&c, &gw, "fanout_upstream_retries_total{upstream=\"u\"}").await;
            (gw, ok, retries, elapsed)
        }
    };
    let (_, ok, retries, _) = run(Gateway::start(&conf(""))).await;
    assert_eq!(ok, 100, "without a budget every failed attempt is retried");
    assert!(retries >= 40, "{retries}");

    let (gw, ok, retries, elapsed) = run(Gateway::start(&conf("retry_budget: 20%, "))).await;
    let shed = metric(
        &c,
        &gw,
        "fanout_shed_total{reason=\"retry_budget\",upstream=\"u\"}",
    )
    .await;
    assert!(
        retries as f64 <= 3.0 + 3.0 * elapsed + 1.0,
        "{retries} retries in {elapsed:.2} s"
    );
    assert!(shed >= 30, "{shed}");
    assert_eq!(
        100 - ok as u64,
        shed,
        "each refused retry is one failed request"
    );
    // Attempts upstream: the requests and their retries, at most 1.25 times the requests.
    assert!(100 + retries <= 125, "{retries}");
}
