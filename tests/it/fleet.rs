//! A fleet of gateways on one Redis (`spool.store: redis`, leased shared limits), against
//! real `redis-server` processes: two instances on one stream deliver every event after
//! one of them is killed with `kill -9`; Redis restarted with AOF mid-stream loses no 202;
//! a full stream answers 503 and every instance counts the fleet's backlog; Redis down
//! answers 503 within the timeout while the rest of the gateway serves; an append Redis
//! answers late still answers 202, and is delivered once; a 3-node Redis
//! Cluster; two instances hold one leased limit within its documented bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::redis::{cluster, Redis};
use crate::common::*;

/// A gateway with `redis:` (`redis` is its value), its spool in Redis, one broadcast route
/// `events` to `targets`, and one proxy route `/plain` to the first target.
fn fleet_gateway(redis: &str, targets: &[(&str, std::net::SocketAddr)], extra: &str) -> Gateway {
    Gateway::start(&fleet_body(redis, targets, extra))
}

/// The configuration [`fleet_gateway`] runs on.
fn fleet_body(redis: &str, targets: &[(&str, std::net::SocketAddr)], extra: &str) -> String {
    let ups: String = targets
        .iter()
        .map(|(n, a)| format!("  {n}: {{ backends: [{a}], timeouts: {{ read: 10s }} }}\n"))
        .collect();
    let names: Vec<&str> = targets.iter().map(|(n, _)| *n).collect();
    format!(
        "redis: {redis}\nspool: {{ store: redis, claim_after: 2s{extra} }}\n\
         defaults: {{ access_log: off }}\nupstreams:\n{ups}\
         routes:\n  - name: events\n    match: {{ prefix: /events }}\n    broadcast: [{}]\n\
         \x20 - name: plain\n    match: {{ prefix: /plain }}\n    upstream: {}\n",
        names.join(", "),
        names[0],
    )
}

/// POSTs `n` events with ids `{prefix}-{i}`, `concurrency` at a time, spread over the
/// `ports` in turn; returns the ids answered 202 and how many got 503.
async fn post_events(
    ports: &[u16],
    prefix: &str,
    n: usize,
    concurrency: usize,
    body_len: usize,
) -> (Vec<String>, usize) {
    let c = client();
    let next = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (c, next, accepted, refused) = (
            c.clone(),
            Arc::clone(&next),
            Arc::clone(&accepted),
            Arc::clone(&refused),
        );
        let (prefix, ports) = (prefix.to_string(), ports.to_vec());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, SeqCst);
                if i >= n {
                    return;
                }
                let id = format!("{prefix}-{i}");
                let port = ports[i % ports.len()];
                let resp = c
                    .post(format!("http://127.0.0.1:{port}/events"))
                    .header("x-request-id", &id)
                    .body(vec![b'x'; body_len])
                    .send()
                    .await;
                match resp.map(|r| r.status().as_u16()) {
                    Ok(202) => accepted.lock().unwrap().push(id),
                    Ok(503) | Err(_) => {
                        refused.fetch_add(1, SeqCst);
                    }
                    Ok(s) => panic!("{id}: {s}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ids = accepted.lock().unwrap().clone();
    (ids, refused.load(SeqCst))
}

/// Each request id `b` received, with the Idempotency-Key of every copy.
fn received(b: &Backend) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for s in b.seen() {
        let header = |n: &str| {
            s.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        out.entry(header("x-request-id"))
            .or_default()
            .push(header("idempotency-key"));
    }
    out
}

/// What `/status` shows of the route's target `upstream`: `field` (`pending`,
/// `pending_bytes`).
async fn target_field(
    c: &reqwest::Client,
    gw: &Gateway,
    upstream: &str,
    field: &str,
) -> Option<u64> {
    let status = status_json(c, gw).await;
    status["routes"]
        .as_array()?
        .iter()
        .filter_map(|r| r["targets"].as_array())
        .flatten()
        .find(|t| t["upstream"] == upstream)?[field]
        .as_u64()
}

async fn pending(c: &reqwest::Client, gw: &Gateway, upstream: &str) -> Option<u64> {
    target_field(c, gw, upstream, "pending").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_stream_and_a_kill_9_loses_nothing() {
    let redis = Redis::start();
    let slow = Backend::start("slow").await;
    slow.set_delay(400);
    let conf = format!("{{ url: {}, timeout: 500ms }}", redis.url());
    let mut a = fleet_gateway(&conf, &[("slow", slow.addr)], "");
    let b = fleet_gateway(&conf, &[("slow", slow.addr)], "");
    let (ids, refused) = post_events(&[a.port, b.port], "fleet", 1000, 32, 64).await;
    assert_eq!((ids.len(), refused), (1000, 0));
    // One instance dies while it holds deliveries (in flight and waiting).
    signal(a.pid(), "-KILL");
    assert!(a.exited_within(Duration::from_secs(5)));
    let before = received(&slow).len();
    assert!(before < 1000, "everything was delivered before the kill");
    wait_all_received(&slow, &ids, Duration::from_secs(90)).await;
    // Duplicates come only from attempts in flight at the kill (at most 64 per instance),
    // and every copy of an event carries the same Idempotency-Key.
    let got = received(&slow);
    let extra: usize = got.values().map(|copies| copies.len() - 1).sum();
    assert!(extra <= 64, "{extra} duplicates");
    for (id, keys) in &got {
        assert!(!keys[0].is_empty(), "{id} came without an Idempotency-Key");
        assert!(keys.iter().all(|k| *k == keys[0]), "{id}: keys {keys:?}");
    }
    let c = client();
    eventually(Duration::from_secs(10), "the stream is empty", || {
        let (c, b) = (c.clone(), &b);
        async move {
            pending(&c, b, "slow").await == Some(0)
                && target_field(&c, b, "slow", "pending_bytes").await == Some(0)
        }
    })
    .await;
    eprintln!("{before} delivered before the kill, {extra} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_answers_503_and_every_instance_counts_the_fleets_backlog() {
    let redis = Redis::start();
    let down = Backend::start("down").await;
    let addr = down.addr;
    down.kill();
    let conf = format!("{{ url: {}, timeout: 500ms }}", redis.url());
    let a = fleet_gateway(&conf, &[("down", addr)], ", max_size: 1MiB");
    let b = fleet_gateway(&conf, &[("down", addr)], ", max_size: 1MiB");
    // 64 KiB events into a 1 MiB stream, all through `a`: about 15 fit.
    let (ids, refused) = post_events(&[a.port], "full", 40, 1, 64 * 1024).await;
    assert!((10..=16).contains(&ids.len()), "{} accepted", ids.len());
    assert_eq!(ids.len() + refused, 40);
    let c = client();
    let r = c
        .post(a.url("/events"))
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    // `b` accepted none of them and holds what it read; it shows the stream's count.
    let n = ids.len() as u64;
    eventually(Duration::from_secs(10), "b counts the whole stream", || {
        let (c, b) = (c.clone(), &b);
        async move { pending(&c, b, "down").await == Some(n) }
    })
    .await;
    let gauge = metric(&c, &b, "fanout_spool_bytes{upstream=\"down\"}").await;
    assert!(gauge >= n * 64 * 1024, "{gauge}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_503_within_the_timeout_and_the_rest_serves() {
    let mut redis = Redis::start();
    let target = Backend::start("t").await;
    let conf = format!("{{ url: {}, timeout: 100ms }}", redis.url());
    let gw = fleet_gateway(&conf, &[("t", target.addr)], "");
    let (ids, _) = post_events(&[gw.port], "up", 5, 1, 10).await;
    assert_eq!(ids.len(), 5);
    wait_all_received(&target, &ids, Duration::from_secs(10)).await;
    redis.kill();
    let c = client();
    for _ in 0..5 {
        let t = Instant::now();
        let r = c.post(gw.url("/events")).body("e").send().await.unwrap();
        let took = t.elapsed();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        assert!(took < Duration::from_millis(600), "answered after {took:?}");
        let (status, _, _) = get(&c, &gw.url("/plain/x")).await;
        assert_eq!(status, 200, "the proxy route serves while Redis is down");
    }
    // Redis back: accepted and delivered again.
    redis.launch();
    eventually(Duration::from_secs(15), "Redis accepts again", || {
        let (c, url) = (c.clone(), gw.url("/events"));
        async move {
            let r = c
                .post(url)
                .header("x-request-id", "again")
                .body("e")
                .send()
                .await;
            r.is_ok_and(|r| r.status() == 202)
        }
    })
    .await;
    let accepted = vec!["again".to_string()];
    wait_all_received(&target, &accepted, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_with_aof_loses_no_202() {
    let mut redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let target = Backend::start("t").await;
    let conf = format!("{{ url: {}, timeout: 200ms }}", redis.url());
    let gw = fleet_gateway(&conf, &[("t", target.addr)], "");
    assert!(
        eventually_line(&gw, "nothing that got a 202 is lost").await,
        "the AOF setting was not checked: {}",
        gw.stderr()
    );
    // Events flow while Redis is killed and started again on its files.
    let stop = Arc::new(AtomicBool::new(false));
    let poster = {
        let (stop, port) = (Arc::clone(&stop), gw.port);
        tokio::spawn(async move {
            let mut all = Vec::new();
            let mut round = 0;
            while !stop.load(SeqCst) {
                let (ids, _) = post_events(&[port], &format!("aof{round}"), 50, 4, 100).await;
                all.extend(ids);
                round += 1;
            }
            all
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.launch();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, SeqCst);
    let ids = poster.await.unwrap();
    assert!(ids.len() > 100, "{} accepted", ids.len());
    wait_all_received(&target, &ids, Duration::from_secs(30)).await;
}

/// Waits (bounded) for `needle` in the gateway's log.
async fn eventually_line(gw: &Gateway, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if gw.stderr().contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_holds_the_spool() {
    let nodes = cluster();
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let (one, two) = (Backend::start("one").await, Backend::start("two").await);
    let conf = format!("{{ url: [{}], timeout: 500ms }}", urls.join(", "));
    let gw = fleet_gateway(&conf, &[("one", one.addr), ("two", two.addr)], "");
    // Until the cluster connection is made, broadcasts are refused: wait for a 202.
    let c = client();
    eventually(Duration::from_secs(15), "the cluster accepts", || {
        let (c, url) = (c.clone(), gw.url("/events"));
        async move {
            let r = c
                .post(url)
                .header("x-request-id", "first")
                .body("e")
                .send()
                .await;
            r.is_ok_and(|r| r.status() == 202)
        }
    })
    .await;
    let (mut ids, refused) = post_events(&[gw.port], "cluster", 200, 8, 100).await;
    assert_eq!((ids.len(), refused), (200, 0));
    ids.push("first".into());
    wait_all_received(&one, &ids, Duration::from_secs(30)).await;
    wait_all_received(&two, &ids, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_hold_one_leased_limit_within_its_bound() {
    const RATE: f64 = 1000.0;
    const BURST: f64 = 100.0;
    const LEASE: f64 = 50.0;
    let redis = Redis::start();
    let backend = Backend::start("b").await;
    let conf = |_: ()| {
        Gateway::start(&format!(
            "redis: {{ url: {}, timeout: 250ms }}\ndefaults: {{ access_log: off }}\n\
             upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - name: leased\n    \
             match: {{ prefix: / }}\n    upstream: u\n    rate_limit: {{ requests_per_second: {RATE}, \
             burst: {BURST}, key: global, store: redis, lease: {LEASE} }}\n",
            redis.url(),
            backend.addr
        ))
    };
    let (a, b) = (conf(()), conf(()));
    // The first lease of each instance, so that the run starts with both connected.
    let c = client();
    for gw in [&a, &b] {
        eventually(Duration::from_secs(10), "a lease", || {
            let (c, url) = (c.clone(), gw.url("/warm"));
            async move { c.get(url).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
    }
    // Let the bucket fill again, then offer well over the limit through both for 4 s.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (admitted, offered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let start = Instant::now();
    let run = Duration::from_secs(4);
    let mut tasks = Vec::new();
    for i in 0..48 {
        let (c, admitted, offered) = (c.clone(), Arc::clone(&admitted), Arc::clone(&offered));
        let url = if i % 2 == 0 { a.url("/x") } else { b.url("/x") };
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < run {
                let r = c.get(&url).send().await;
                offered.fetch_add(1, SeqCst);
                match r.map(|r| r.status().as_u16()) {
                    Ok(200) => {
                        admitted.fetch_add(1, SeqCst);
                    }
                    Ok(429) => {}
                    other => panic!("{other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (admitted, offered) = (admitted.load(SeqCst) as f64, offered.load(SeqCst) as f64);
    // The documented bound: the exact limit's r·T + b + 1, plus min(I·N, r·TTL).
    let exact = RATE * elapsed + BURST + 1.0;
    let bound = exact + (2.0 * LEASE).min(RATE * 1.0);
    eprintln!(
        "offered {:.0}/s, admitted {admitted} in {elapsed:.2}s (exact limit {exact:.0}, bound {bound:.0})",
        offered / elapsed
    );
    assert!(
        offered > 1.5 * RATE * elapsed,
        "the load did not exceed the limit"
    );
    assert!(
        admitted <= bound,
        "{admitted} admitted over the bound {bound}"
    );
    assert!(
        admitted <= 1.05 * exact,
        "{admitted} is over 5 % above {exact}"
    );
    assert!(
        admitted >= 0.9 * RATE * elapsed,
        "{admitted} admitted: the leases starve the limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_redis_spool_and_what_it_holds() {
    let redis = Redis::start();
    let target = Backend::start("t").await;
    let addr = target.addr;
    target.kill();
    let conf = format!("{{ url: {}, timeout: 500ms }}", redis.url());
    let body = fleet_body(&conf, &[("t", addr)], "");
    let gw = Gateway::start(&body);
    let (ids, refused) = post_events(&[gw.port], "reload", 5, 1, 10).await;
    assert_eq!((ids.len(), refused), (5, 0));
    let c = client();
    eventually(Duration::from_secs(10), "5 pending", || {
        let (c, gw) = (c.clone(), &gw);
        async move { pending(&c, gw, "t").await == Some(5) }
    })
    .await;
    // A reload that adds a route: the stream, its count and the deliveries held stay.
    let more = "  - name: extra\n    match: { prefix: /extra }\n    upstream: t\n";
    gw.rewrite(
        &format!("[\"127.0.0.1:{}\"]", gw.port),
        &format!("{body}{more}"),
    );
    let r = c.post(gw.admin_url("/reload")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert_eq!(pending(&c, &gw, "t").await, Some(5));
    // The target comes back: what was accepted before the reload is delivered after it.
    let back = Backend::start_at("t", addr)
        .await
        .expect("the target's address again");
    wait_all_received(&back, &ids, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(10), "the stream is empty", || {
        let (c, gw) = (c.clone(), &gw);
        async move { pending(&c, gw, "t").await == Some(0) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_append_answers_202_and_each_target_gets_the_event_once() {
    // Redis held back past `redis.timeout` (50 ms) by DEBUG SLEEP: the append lands late;
    // the client must hear 202 for it, never a 503 that makes it send the event again.
    let redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let conf = format!("{{ url: {}, timeout: 50ms }}", redis.url());
    let gw = fleet_gateway(&conf, &[("a", a.addr), ("b", b.addr)], "");
    let (warm, _) = post_events(&[gw.port], "warm", 3, 1, 10).await;
    assert_eq!(warm.len(), 3);
    let url = redis.url();
    let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap();
    let sleeper = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"DEBUG SLEEP 0.3\r\n").unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let (ids, refused) = post_events(&[gw.port], "slow", 8, 8, 10).await;
    let took = started.elapsed();
    assert!(
        sleeper.join().unwrap().starts_with("+OK"),
        "DEBUG SLEEP ran"
    );
    assert_eq!(
        (ids.len(), refused),
        (8, 0),
        "every slow append answered 202"
    );
    assert!(
        took >= Duration::from_millis(150),
        "Redis was held back ({took:?})"
    );
    for target in [&a, &b] {
        wait_all_received(target, &ids, Duration::from_secs(15)).await;
        let got = received(target);
        for id in &ids {
            assert_eq!(got[id].len(), 1, "{id} delivered once");
        }
    }
}
