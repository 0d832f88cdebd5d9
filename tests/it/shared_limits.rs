//! Rate limits shared through Redis (`rate_limit.store: redis`), against a real
//! `redis-server` started by each test on a free loopback port: two fanout instances hold
//! one limit together; Redis stopped, hung or back again; a Redis Cluster given as a list
//! of nodes. `make test` installs redis-server where it is missing.

use std::time::{Duration, Instant};

use crate::common::redis::{cluster, Redis};
use crate::common::*;

/// A gateway whose route `shared` has `limit` (a rate_limit mapping's inside) over
/// `backend`, with `redis` as its top-level `redis:` value.
fn gateway(backend: &Backend, redis: &str, limit: &str) -> Gateway {
    Gateway::start(&format!(
        "redis: {redis}\nupstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - name: shared\n    \
         match: {{ prefix: / }}\n    upstream: u\n    rate_limit: {{ {limit} }}\n",
        backend.addr
    ))
}

/// Sends `n` requests one after another; the statuses and the slowest answer.
async fn statuses(c: &reqwest::Client, url: &str, n: usize) -> (Vec<u16>, Duration) {
    let mut out = Vec::with_capacity(n);
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let t = Instant::now();
        let status = c.get(url).send().await.map_or(0, |r| r.status().as_u16());
        slowest = slowest.max(t.elapsed());
        out.push(status);
    }
    (out, slowest)
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_hold_one_limit_together() {
    let redis = Redis::start();
    let b = Backend::start("b").await;
    let conf = format!("{{ url: {}, timeout: 250ms }}", redis.url());
    let limit = "requests_per_second: 100, burst: 10, key: global, store: redis";
    let gws = [gateway(&b, &conf, limit), gateway(&b, &conf, limit)];
    let c = client();
    // Four clients, two on each instance, each offering a request every 4 ms (about
    // 1,000/s together, ten times the limit) for 10 s.
    let run = Duration::from_secs(10);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (c, url) = (c.clone(), gws[i % 2].url("/shared"));
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut limited, mut other) = (0u64, 0u64, 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while started.elapsed() < run {
                tick.tick().await;
                match c.get(&url).send().await.map(|r| r.status().as_u16()) {
                    Ok(200) => ok += 1,
                    Ok(429) => limited += 1,
                    _ => other += 1,
                }
            }
            (ok, limited, other)
        }));
    }
    let (mut ok, mut limited, mut other) = (0, 0, 0);
    for t in tasks {
        let (o, l, x) = t.await.unwrap();
        ok += o;
        limited += l;
        other += x;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = 10.0 + 100.0 * elapsed;
    eprintln!("{ok} allowed, {limited} limited, {other} other in {elapsed:.2} s; expected ≈ {expected:.0}");
    assert_eq!(other, 0, "every answer is a 200 or a 429");
    assert!(limited > ok, "the clients offered far more than the limit");
    // Within 5 % of the configured rate over the run (the burst allowed on top).
    assert!(
        (ok as f64 - expected).abs() <= 100.0 * elapsed * 0.05,
        "{ok} allowed by the two instances together, expected {expected:.0} ± 5 %"
    );
    assert_eq!(b.hits() as u64, ok);
    // Each instance let some through: the limit was shared, not one instance's alone.
    for gw in &gws {
        let refused = metric(&c, gw, "fanout_rate_limited_total{route=\"shared\"}").await;
        assert!(refused > 0);
        let errors = metric(
            &c,
            gw,
            "fanout_rate_limit_store_errors_total{route=\"shared\"}",
        )
        .await;
        assert_eq!(errors, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_lets_requests_through_then_the_limit_holds_again() {
    let mut redis = Redis::start();
    let b = Backend::start("b").await;
    let gw = gateway(
        &b,
        &format!("{{ url: {}, timeout: 50ms }}", redis.url()),
        "requests_per_second: 1, burst: 3, key: global, store: redis, on_store_error: allow",
    );
    let c = client();
    let url = gw.url("/x");
    let (before, _) = statuses(&c, &url, 6).await;
    assert_eq!(count(&before, 200), 3, "{before:?}");
    assert_eq!(count(&before, 429), 3, "{before:?}");

    // Redis gone: every request goes through (fail open), none waits past the timeout.
    redis.kill();
    let (down, slowest) = statuses(&c, &url, 20).await;
    assert_eq!(count(&down, 200), 20, "{down:?}");
    assert!(
        slowest < Duration::from_millis(500),
        "slowest answer {slowest:?}"
    );
    let errors = metric(
        &c,
        &gw,
        "fanout_rate_limit_store_errors_total{route=\"shared\"}",
    )
    .await;
    assert!(errors >= 20, "{errors} store errors counted");

    // Redis back (empty): the connection is remade on its own and the limit holds again.
    redis.launch();
    eventually(Duration::from_secs(15), "the limit applies again", || {
        let (c, url) = (c.clone(), url.clone());
        async move { count(&statuses(&c, &url, 5).await.0, 429) > 0 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_with_deny_answers_503_within_the_timeout() {
    let redis = Redis::start();
    let b = Backend::start("b").await;
    let gw = gateway(
        &b,
        &format!("{{ url: {}, timeout: 100ms, pool: 2 }}", redis.url()),
        "requests_per_second: 100, burst: 100, key: client_ip, store: redis, on_store_error: deny",
    );
    let c = client();
    let url = gw.url("/x");
    let (ok, _) = statuses(&c, &url, 3).await;
    assert_eq!(ok, vec![200, 200, 200]);

    // Redis hung (SIGSTOP): connections stay open, nothing answers.
    signal(redis.pid(), "-STOP");
    for _ in 0..5 {
        let t = Instant::now();
        let resp = c.get(&url).send().await.unwrap();
        let took = t.elapsed();
        assert_eq!(resp.status().as_u16(), 503);
        assert_eq!(resp.headers()["retry-after"], "1");
        assert!(
            took >= Duration::from_millis(90) && took < Duration::from_millis(600),
            "answered after {took:?}, the timeout is 100ms"
        );
    }
    assert_eq!(
        b.hits(),
        3,
        "nothing reached the backend while Redis was hung"
    );
    signal(redis.pid(), "-CONT");
    eventually(Duration::from_secs(10), "requests pass again", || {
        let (c, url) = (c.clone(), url.clone());
        async move { statuses(&c, &url, 1).await.0 == vec![200] }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_given_as_a_list_holds_the_limit() {
    let nodes = cluster();
    let b = Backend::start("b").await;
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let gw = gateway(
        &b,
        &format!("{{ url: [{}], timeout: 200ms }}", urls.join(", ")),
        "requests_per_second: 1, burst: 5, key: header:X-Key, store: redis",
    );
    let c = client();
    // Until the cluster connection is made, decisions are store errors (allowed): wait
    // until a fresh key is limited, which only the cluster can decide.
    let attempt = std::sync::atomic::AtomicUsize::new(0);
    eventually(Duration::from_secs(10), "the cluster decides", || {
        let c = c.clone();
        let url = gw.url("/warm");
        let key = format!(
            "warm-{}",
            attempt.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        async move {
            let mut limited = false;
            for _ in 0..7 {
                let r = c.get(&url).header("x-key", &key).send().await;
                limited |= r.is_ok_and(|r| r.status() == 429);
            }
            limited
        }
    })
    .await;
    let errors_before = metric(
        &c,
        &gw,
        "fanout_rate_limit_store_errors_total{route=\"shared\"}",
    )
    .await;
    // Keys spread over the cluster's slots: each gets its own burst of 5, then 429s.
    for key in ["alpha", "beta", "gamma", "delta"] {
        let mut got = Vec::new();
        for _ in 0..8 {
            let r = c
                .get(gw.url("/k"))
                .header("x-key", key)
                .send()
                .await
                .unwrap();
            got.push(r.status().as_u16());
        }
        assert_eq!(count(&got, 200), 5, "{key}: {got:?}");
        assert_eq!(count(&got, 429), 3, "{key}: {got:?}");
    }
    let errors = metric(
        &c,
        &gw,
        "fanout_rate_limit_store_errors_total{route=\"shared\"}",
    )
    .await;
    assert_eq!(errors, errors_before, "no store error once connected");
}
