//! The response cache (RFC 9111) against a real origin that counts its requests and sets
//! headers per path: MISS then HIT, what must not be stored, expiry, `Vary` variants, ETag
//! revalidation, one upstream request per stampede, stale-if-error, the `max_size` bound,
//! purges, and the cache beside rate limits, mirrors and the access log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// An origin whose answers depend on the path; it counts requests per path and can be
/// made to fail (503) with `down`.
struct Origin {
    addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    /// Conditional requests it answered 304.
    not_modified: Arc<Mutex<usize>>,
    down: Arc<AtomicBool>,
}

impl Origin {
    async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let not_modified: Arc<Mutex<usize>> = Arc::default();
        let down = Arc::new(AtomicBool::new(false));
        let (h, n, d) = (
            Arc::clone(&hits),
            Arc::clone(&not_modified),
            Arc::clone(&down),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (h, n, d) = (Arc::clone(&h), Arc::clone(&n), Arc::clone(&d));
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (h, n, d) = (Arc::clone(&h), Arc::clone(&n), Arc::clone(&d));
                        async move { Ok::<_, std::io::Error>(answer(req, &h, &n, &d).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin {
            addr,
            hits,
            not_modified,
            down,
        }
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    hits: &Mutex<HashMap<String, usize>>,
    not_modified: &Mutex<usize>,
    down: &AtomicBool,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let n = {
        let mut h = hits.lock().unwrap();
        let n = h.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    if down.load(SeqCst) {
        return Response::builder()
            .status(503)
            .body(Full::new(Bytes::from_static(b"down")))
            .unwrap();
    }
    let mut b = Response::builder().status(200);
    let mut body = format!("{path} #{n}");
    match path.as_str() {
        "/no-store" => b = b.header("cache-control", "no-store"),
        "/private" => b = b.header("cache-control", "private, max-age=60"),
        "/short" | "/fragile" => b = b.header("cache-control", "max-age=1"),
        "/vary" => {
            let enc = req
                .headers()
                .get("accept-encoding")
                .map_or("none".to_string(), |v| v.to_str().unwrap().to_string());
            body = format!("{path} #{n} for {enc}");
            b = b
                .header("cache-control", "max-age=60")
                .header("vary", "Accept-Encoding");
        }
        "/etag" => {
            let tag = "\"v1\"";
            if req.headers().get("if-none-match").is_some_and(|v| v == tag) {
                *not_modified.lock().unwrap() += 1;
                return Response::builder()
                    .status(304)
                    .header("etag", tag)
                    .header("cache-control", "max-age=1")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
            }
            b = b.header("etag", tag).header("cache-control", "max-age=1");
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            b = b.header("cache-control", "max-age=60");
        }
        "/nothing-stated" => {}
        p if p.starts_with("/big/") => {
            body = "x".repeat(100 * 1024);
            b = b.header("cache-control", "max-age=600");
        }
        _ => b = b.header("cache-control", "max-age=60"),
    }
    b.body(Full::new(Bytes::from(body))).unwrap()
}

fn gateway(origin: &Origin, max_size: &str, route_extra: &str) -> Gateway {
    Gateway::start(&format!(
        "cache: {{ max_size: {max_size} }}\n\
         upstreams:\n  origin: {{ backends: [{}], retries: 0 }}\n\
         routes:\n  - name: cached\n    match: {{ prefix: / }}\n    upstream: origin\n    \
         cache: {{ ttl: 30s, max_object_size: 1MiB, stale_if_error: 3s }}\n{route_extra}",
        origin.addr
    ))
}

/// GET `path` with `headers`: status, `X-Cache`, body.
async fn get_with(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut req = client().get(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let x_cache = r
        .headers()
        .get("x-cache")
        .map_or(String::new(), |v| v.to_str().unwrap().to_string());
    (status, x_cache, r.text().await.unwrap())
}

async fn fetch(gw: &Gateway, path: &str) -> (u16, String, String) {
    get_with(gw, path, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_then_hits_and_a_head_from_the_cached_get() {
    let origin = Origin::start().await;
    let gw = gateway(&origin, "64MiB", "");
    let first = fetch(&gw, "/page").await;
    assert_eq!((first.0, first.1.as_str()), (200, "MISS"));
    for _ in 0..3 {
        let again = fetch(&gw, "/page").await;
        assert_eq!(
            (again.0, again.1.as_str(), again.2.as_str()),
            (200, "HIT", first.2.as_str())
        );
    }
    let head = client().head(gw.url("/page")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-cache"], "HIT");
    assert_eq!(origin.hits("/page"), 1);
    // Another query is another entry.
    assert_eq!(fetch(&gw, "/page?x=1").await.1, "MISS");
    let c = client();
    let hit = "fanout_cache_requests_total{result=\"hit\",route=\"cached\"}";
    assert_eq!(metric(&c, &gw, hit).await, 4);
    let line = stdout_line(&gw, "\"cache\":\"hit\"").await;
    assert!(line.contains("\"path\":\"/page\""), "{line}");
    let status = status_json(&c, &gw).await;
    assert_eq!(status["cache"]["entries"], 2, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_must_not_be_stored_is_not() {
    let origin = Origin::start().await;
    let gw = gateway(&origin, "64MiB", "");
    for path in ["/no-store", "/private"] {
        for _ in 0..2 {
            assert_eq!(fetch(&gw, path).await.1, "MISS", "{path}");
        }
        assert_eq!(origin.hits(path), 2, "{path}");
    }
    for _ in 0..2 {
        let (_, x, _) = get_with(&gw, "/auth", &[("authorization", "Bearer t")]).await;
        assert_eq!(x, "MISS");
    }
    assert_eq!(
        origin.hits("/auth"),
        2,
        "an answer to Authorization is not shared"
    );
    // A client's no-store bypasses the cache.
    let (_, x, _) = get_with(&gw, "/page", &[("cache-control", "no-store")]).await;
    assert_eq!(x, "BYPASS");
    // No freshness stated: the route's ttl applies.
    fetch(&gw, "/nothing-stated").await;
    assert_eq!(fetch(&gw, "/nothing-stated").await.1, "HIT");
    // POST is never served from the cache.
    let r = client()
        .post(gw.url("/page"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "BYPASS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_expires_and_vary_keeps_variants() {
    let origin = Origin::start().await;
    let gw = gateway(&origin, "64MiB", "");
    assert_eq!(fetch(&gw, "/short").await.1, "MISS");
    assert_eq!(fetch(&gw, "/short").await.1, "HIT");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (_, x, body) = fetch(&gw, "/short").await;
    assert_eq!((x.as_str(), body.as_str()), ("EXPIRED", "/short #2"));
    assert_eq!(origin.hits("/short"), 2);

    let gzip = [("accept-encoding", "gzip")];
    let br = [("accept-encoding", "br")];
    assert_eq!(get_with(&gw, "/vary", &gzip).await.1, "MISS");
    assert_eq!(get_with(&gw, "/vary", &br).await.1, "MISS");
    let (_, x, body) = get_with(&gw, "/vary", &gzip).await;
    assert_eq!((x.as_str(), body.as_str()), ("HIT", "/vary #1 for gzip"));
    let (_, x, body) = get_with(&gw, "/vary", &br).await;
    assert_eq!((x.as_str(), body.as_str()), ("HIT", "/vary #2 for br"));
    assert_eq!(origin.hits("/vary"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_is_revalidated_with_its_etag() {
    let origin = Origin::start().await;
    let gw = gateway(&origin, "64MiB", "");
    let (_, x, first) = fetch(&gw, "/etag").await;
    assert_eq!(x, "MISS");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, x, body) = fetch(&gw, "/etag").await;
    assert_eq!((status, x.as_str()), (200, "REVALIDATED"));
    assert_eq!(body, first, "the full answer, from the refreshed entry");
    assert_eq!(
        *origin.not_modified.lock().unwrap(),
        1,
        "the origin answered 304"
    );
    // A client's own conditional request gets its 304 from the cache.
    let r = client()
        .get(gw.url("/etag"))
        .header("if-none-match", "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(origin.hits("/etag"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_requests_for_a_cold_key_send_one_upstream() {
    let origin = Origin::start().await;
    let gw = gateway(&origin, "64MiB", "");
    let url = gw.url("/slow");
    let c = client();
    let all: Vec<_> = (0..200)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let r = c.get(url).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        })
        .collect();
    for t in all {
        let (status, body) = t.await.unwrap();
        assert_eq!((status, body.as_str()), (200, "/slow #1"));
    }
    assert_eq!(origin.hits("/slow"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_origin_is_covered_by_stale_if_error_then_not() {
    let origin = Origin::start().await;
    let gw = gateway(&origin, "64MiB", "");
    let (_, _, first) = fetch(&gw, "/fragile").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    origin.down.store(true, SeqCst);
    let (status, x, body) = fetch(&gw, "/fragile").await;
    assert_eq!(
        (status, x.as_str(), body.as_str()),
        (200, "STALE", first.as_str())
    );
    // Past max-age (1 s) + stale_if_error (3 s): the failure shows.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (status, _, _) = fetch(&gw, "/fragile").await;
    assert!(status >= 500, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_stays_under_max_size_and_purges_work() {
    let origin = Origin::start().await;
    let gw = gateway(&origin, "1MiB", "");
    // 3 MiB of 100 KiB answers into a 1 MiB cache.
    for i in 0..30 {
        assert_eq!(fetch(&gw, &format!("/big/{i}")).await.0, 200);
    }
    let c = client();
    let status = status_json(&c, &gw).await;
    let bytes = status["cache"]["bytes"].as_u64().unwrap();
    assert!(bytes <= 1024 * 1024, "{bytes} bytes cached");
    assert!(bytes >= 512 * 1024, "{bytes} bytes cached");
    assert!(metric(&c, &gw, "fanout_cache_evictions_total").await >= 15);
    assert!(metric(&c, &gw, "fanout_cache_size_bytes").await <= 1024 * 1024);

    // Purge one key (every variant), then everything.
    fetch(&gw, "/page").await;
    assert_eq!(fetch(&gw, "/page").await.1, "HIT");
    let purge = |q: &'static str| {
        let c = c.clone();
        let url = gw.admin_url(&format!("/cache{q}"));
        async move {
            let r = c.delete(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["purged"]
                .as_u64()
                .unwrap()
        }
    };
    assert_eq!(purge("?host=127.0.0.1&path=/page").await, 1);
    assert_eq!(fetch(&gw, "/page").await.1, "MISS");
    assert!(purge("").await >= 2);
    assert_eq!(fetch(&gw, "/page").await.1, "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_still_pass_rate_limits_and_are_mirrored() {
    let origin = Origin::start().await;
    let shadow = Backend::start("shadow").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  origin: {{ backends: [{}] }}\n  shadow: {{ backends: [{}] }}\n\
         routes:\n  - name: cached\n    match: {{ prefix: / }}\n    upstream: origin\n    \
         cache: {{ ttl: 30s }}\n    mirror: [{{ upstream: shadow }}]\n    \
         rate_limit: {{ requests_per_second: 1, burst: 3 }}\n",
        origin.addr, shadow.addr
    ));
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (status, x, _) = fetch(&gw, "/page").await;
        statuses.push((status, x));
    }
    assert_eq!(statuses[0], (200, "MISS".to_string()));
    assert_eq!(statuses[1], (200, "HIT".to_string()));
    assert!(statuses.iter().any(|(s, _)| *s == 429), "{statuses:?}");
    assert_eq!(origin.hits("/page"), 1);
    eventually(Duration::from_secs(5), "hits mirrored too", || async {
        shadow.hits() >= 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_origin_is_covered_too_and_stale_while_revalidate_answers_at_once() {
    // An origin that states nothing (the route's 1 s ttl applies), then is gone.
    let origin = Backend::start("origin").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  origin: {{ backends: [{}], retries: 0 }}\n  slow: {{ backends: [{}] }}\n\
         routes:\n  - name: cached\n    match: {{ prefix: /a }}\n    upstream: origin\n    \
         cache: {{ ttl: 1s, stale_if_error: 30s }}\n\
         \x20 - name: swr\n    match: {{ prefix: /b }}\n    upstream: slow\n    \
         cache: {{ ttl: 1s, stale_while_revalidate: 30s }}\n",
        origin.addr, origin.addr
    ));
    assert_eq!(fetch(&gw, "/a").await.1, "MISS");
    origin.kill();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, x, body) = fetch(&gw, "/a").await;
    assert_eq!(
        (status, x.as_str(), body.as_str()),
        (200, "STALE", "origin")
    );

    // stale-while-revalidate: a slow origin, and the stale answer comes at once.
    let slow = Backend::start("slow").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  slow: {{ backends: [{}] }}\n\
         routes:\n  - name: swr\n    match: {{ prefix: / }}\n    upstream: slow\n    \
         cache: {{ ttl: 1s, stale_while_revalidate: 30s }}\n",
        slow.addr
    ));
    assert_eq!(fetch(&gw, "/b").await.1, "MISS");
    slow.set_delay(1000);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = std::time::Instant::now();
    let (status, x, _) = fetch(&gw, "/b").await;
    assert_eq!((status, x.as_str()), (200, "STALE"));
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    // The background refresh (one, however many stale answers went out meanwhile) makes
    // the entry fresh again.
    eventually(Duration::from_secs(5), "the entry refreshed", || async {
        fetch(&gw, "/b").await.1 == "HIT"
    })
    .await;
    assert_eq!(slow.hits(), 2);
}
