//! Mirroring: copies carry the body byte for byte and lose the redacted headers; sampling
//! by percent and by key; slow, dead and saturated mirrors never touch the primary.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn conf(primary: &Backend, mirror: &str, options: &str) -> String {
    format!(
        "upstreams:\n  main: {{ backends: [{}] }}\n  shadow: {{ backends: [{mirror}] }}\n\
         routes:\n  - name: mirrored\n    match: {{ prefix: / }}\n    upstream: main\n    \
         max_body_bytes: 4MiB\n    mirror:\n      - {{ upstream: shadow{options} }}\n",
        primary.addr
    )
}

/// The value of one `fanout_mirror_requests_total` series.
async fn mirror_count(c: &reqwest::Client, gw: &Gateway, outcome: &str) -> u64 {
    let series = format!("fanout_mirror_requests_total{{outcome=\"{outcome}\",route=\"mirrored\",upstream=\"shadow\"}}");
    metric(c, gw, &series).await
}

/// A primary and a shadow backend behind a gateway whose route mirrors to the shadow with
/// the given mirror `options`.
async fn mirrored(options: &str) -> (Backend, Backend, Gateway) {
    let (primary, shadow) = (
        Backend::start("primary").await,
        Backend::start("shadow").await,
    );
    let gw = Gateway::start(&conf(&primary, &shadow.addr.to_string(), options));
    (primary, shadow, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_carry_the_body_and_lose_redacted_headers() {
    let (primary, shadow, gw) = mirrored(", headers: { set: { X-Shadow: \"1\" } }").await;
    let c = client();
    let body: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let resp = c
        .post(gw.url("/upload?x=1"))
        .header("host", "api.example.com")
        .header("authorization", "Bearer secret")
        .header("cookie", "session=1")
        .header("x-request-id", "mirror-1")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backend"], "primary");
    eventually(Duration::from_secs(5), "the copy arrives", || async {
        shadow.hits() == 1
    })
    .await;

    let (p, s) = (&primary.seen()[0], &shadow.seen()[0]);
    assert!(p.body == body, "primary body differs");
    assert!(
        s.body == body,
        "mirror body differs ({} bytes)",
        s.body.len()
    );
    assert_eq!(
        (s.method.as_str(), s.path.as_str()),
        ("POST", "/upload?x=1")
    );
    assert_eq!(s.headers["host"], "api.example.com");
    assert_eq!(s.headers["x-request-id"], "mirror-1");
    assert_eq!(s.headers["x-shadow"], "1");
    assert!(s.headers.get("authorization").is_none() && s.headers.get("cookie").is_none());
    assert_eq!(p.headers["authorization"], "Bearer secret");
    assert_eq!(p.headers["cookie"], "session=1");
    assert!(p.headers.get("x-shadow").is_none());
    eventually(Duration::from_secs(5), "ok counted", || async {
        mirror_count(&c, &gw, "ok").await == 1
    })
    .await;
    // A copy is not a client request: totals and access log count one request.
    let status: serde_json::Value = status_json(&c, &gw).await;
    assert_eq!(status["totals"]["requests"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_samples_requests() {
    let (_primary, shadow, gw) = mirrored(", percent: 30").await;
    let c = client();
    for i in 0..1000 {
        assert_eq!(get(&c, &gw.url(&format!("/p/{i}"))).await.0, 200);
    }
    eventually(Duration::from_secs(5), "copies settle", || async {
        mirror_count(&c, &gw, "ok").await == shadow.hits() as u64
    })
    .await;
    let share = shadow.hits() as f64 / 1000.0;
    assert!((0.24..=0.36).contains(&share), "mirrored share {share}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_by_never_splits_a_key() {
    let (_primary, shadow, gw) = mirrored(", percent: 50, sample_by: header:X-User-Id").await;
    let c = client();
    for round in 0..5 {
        for user in 0..40 {
            let resp = c
                .get(gw.url(&format!("/k/{round}")))
                .header("x-user-id", format!("user-{user}"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
    }
    eventually(Duration::from_secs(5), "copies settle", || async {
        mirror_count(&c, &gw, "ok").await == shadow.hits() as u64
    })
    .await;
    let mut per_user = std::collections::HashMap::new();
    for s in shadow.seen() {
        *per_user
            .entry(s.headers["x-user-id"].to_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    for (user, n) in &per_user {
        assert_eq!(*n, 5, "{user} was mirrored {n} of 5 times");
    }
    assert!(
        (5..=35).contains(&per_user.len()),
        "{} of 40 users sampled",
        per_user.len()
    );
}

/// Sends `n` sequential requests; every answer must be the primary's 200.
async fn all_primary(c: &reqwest::Client, gw: &Gateway, n: usize) {
    for i in 0..n {
        let resp = c
            .post(gw.url(&format!("/s/{i}")))
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backend"], "primary");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_dead_mirrors_cost_the_primary_nothing() {
    let (primary, slow) = (
        Backend::start("primary").await,
        Backend::start("slow").await,
    );
    slow.set_delay(1000);
    let gw = Gateway::start(&conf(&primary, &slow.addr.to_string(), ", timeout: 3s"));
    let c = client();
    let started = Instant::now();
    all_primary(&c, &gw, 30).await;
    // Thirty copies each held for 1 s: a mirror that blocked the client would take 30 s.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    eventually(Duration::from_secs(10), "slow copies finish", || async {
        mirror_count(&c, &gw, "ok").await == 30
    })
    .await;
    // Copies without a body travel on pipelined lanes: they must not queue behind each
    // other either (forty one-second copies in line would far exceed their 3 s timeout).
    let started = Instant::now();
    many_gets(&c, &gw, 40, 8).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    eventually(
        Duration::from_secs(6),
        "slow bodiless copies finish",
        || async { mirror_count(&c, &gw, "ok").await == 70 },
    )
    .await;
    assert_eq!(mirror_count(&c, &gw, "error").await, 0);

    let dead = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(&conf(&primary, &dead, ""));
    all_primary(&c, &gw, 30).await;
    eventually(
        Duration::from_secs(5),
        "dead copies counted as errors",
        || async { mirror_count(&c, &gw, "error").await == 30 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_beyond_max_inflight_are_dropped_and_counted() {
    let (primary, slow) = (
        Backend::start("primary").await,
        Backend::start("slow").await,
    );
    slow.set_delay(2000);
    let gw = Gateway::start(&conf(
        &primary,
        &slow.addr.to_string(),
        ", max_inflight: 2, timeout: 5s",
    ));
    let c = client();
    all_primary(&c, &gw, 10).await;
    assert_eq!(mirror_count(&c, &gw, "dropped").await, 8);
    let metrics = metrics_text(&c, &gw).await;
    assert!(
        metrics.contains("fanout_mirror_inflight{route=\"mirrored\",upstream=\"shadow\"} 2"),
        "{metrics}"
    );
    eventually(Duration::from_secs(8), "the two copies finish", || async {
        mirror_count(&c, &gw, "ok").await == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_mirror_limit_are_not_copied() {
    let (primary, shadow, gw) = mirrored(", max_body_bytes: 1KiB").await;
    let c = client();
    let resp = c
        .post(gw.url("/big"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(primary.seen()[0].body.len(), 4096);
    assert_eq!(mirror_count(&c, &gw, "too_large").await, 1);
    // A small body after it is copied: the large one would have arrived before it.
    let resp = c.post(gw.url("/small")).body("s").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    eventually(Duration::from_secs(5), "the small copy", || async {
        shadow.hits() >= 1
    })
    .await;
    let paths: Vec<String> = shadow.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, vec!["/small".to_string()]);
}

/// A mirror written by hand for copies without a body: it reads pipelined request heads
/// and answers each in turn, rotating through a Content-Length body, a chunked body with a
/// trailer and a 204 (a HEAD gets its Content-Length and no body). Counts requests and
/// connections.
struct RawMirror {
    addr: std::net::SocketAddr,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// How a [`RawMirror`] behaves.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Keeps connections open.
    KeepAlive,
    /// Says `Connection: close` and closes after every answer.
    CloseEach,
    /// Breaks three connections in four: garbage for an answer, a close without an answer,
    /// a body cut short; answers the fourth properly.
    Broken,
}

impl RawMirror {
    async fn start(mode: Mode) -> RawMirror {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (requests, connections) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (r, c) = (Arc::clone(&requests), Arc::clone(&connections));
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                c.fetch_add(1, SeqCst);
                let r = Arc::clone(&r);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let mut answers = Vec::new();
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            let n = r.fetch_add(1, SeqCst);
                            let close = if mode == Mode::CloseEach {
                                "connection: close\r\n"
                            } else {
                                ""
                            };
                            let broken = match n % 4 {
                                _ if mode != Mode::Broken => None,
                                0 => Some(&b"garbage\r\n\r\n"[..]),
                                1 => Some(&b""[..]),
                                2 => Some(&b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"[..]),
                                _ => None,
                            };
                            if let Some(bytes) = broken {
                                let _ = conn.write_all(&answers).await;
                                let _ = conn.write_all(bytes).await;
                                return;
                            }
                            let answer = if head.starts_with(b"HEAD ") {
                                format!("HTTP/1.1 200 OK\r\n{close}content-length: 5\r\n\r\n")
                            } else {
                                match n % 3 {
                                    0 => format!("HTTP/1.1 200 OK\r\n{close}content-length: 5\r\n\r\nhello"),
                                    1 => format!("HTTP/1.1 404 Not Found\r\n{close}transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"),
                                    _ => format!("HTTP/1.1 204 No Content\r\n{close}\r\n"),
                                }
                            };
                            answers.extend_from_slice(answer.as_bytes());
                            if mode == Mode::CloseEach {
                                break;
                            }
                        }
                        if !answers.is_empty()
                            && (conn.write_all(&answers).await.is_err() || mode == Mode::CloseEach)
                        {
                            return;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        RawMirror {
            addr,
            requests,
            connections,
            task,
        }
    }
}

impl Drop for RawMirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `n` GETs (every fifth a HEAD) from `parallel` clients at once; all must be 200.
async fn many_gets(c: &reqwest::Client, gw: &Gateway, n: usize, parallel: usize) {
    let mut clients = tokio::task::JoinSet::new();
    for p in 0..parallel {
        let (c, base) = (c.clone(), gw.url(""));
        clients.spawn(async move {
            for i in (p..n).step_by(parallel) {
                let url = format!("{base}/g/{i}");
                let req = if i % 5 == 0 { c.head(url) } else { c.get(url) };
                let status = req.send().await.unwrap().status();
                assert_eq!(status, 200);
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
}

/// Mirrors `n` GETs and HEADs from `parallel` clients to a [`RawMirror`]: every copy must
/// arrive once and be counted `ok`. Returns the mirror for further checks.
async fn every_copy_arrives(mode: Mode, n: usize, parallel: usize) -> RawMirror {
    let primary = Backend::start("primary").await;
    let mirror = RawMirror::start(mode).await;
    let gw = Gateway::start(&conf(&primary, &mirror.addr.to_string(), ", timeout: 5s"));
    let c = client();
    many_gets(&c, &gw, n, parallel).await;
    eventually(Duration::from_secs(10), "every copy answered", || async {
        mirror_count(&c, &gw, "ok").await == n as u64
    })
    .await;
    assert_eq!(mirror_count(&c, &gw, "error").await, 0);
    assert_eq!(mirror.requests.load(SeqCst), n);
    mirror
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_copies_share_pipelined_connections_and_all_arrive() {
    let mirror = every_copy_arrives(Mode::KeepAlive, 600, 32).await;
    // Connections are reused (about one per client here), never one per copy.
    let conns = mirror.connections.load(SeqCst);
    assert!(conns <= 100, "{conns} connections for 600 copies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_closing_after_every_answer_still_gets_every_copy() {
    // Each answer says `Connection: close`: copies written behind it go again elsewhere.
    every_copy_arrives(Mode::CloseEach, 200, 16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_sent_with_their_heads_arrive_intact() {
    // Bodies that arrive whole go on pipelined lanes with their heads; a chunked body and
    // one over 64 KiB stream through the connector. All must arrive byte for byte.
    let (_primary, shadow, gw) = mirrored("").await;
    let c = client();
    let mut clients = tokio::task::JoinSet::new();
    for p in 0..16 {
        let (c, base) = (c.clone(), gw.url(""));
        clients.spawn(async move {
            for i in (p..200).step_by(16) {
                let body = format!("body-{i}-").repeat(1 + i % 40);
                let resp = c
                    .post(format!("{base}/b/{i}"))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 249) as u8).collect();
    let resp = c
        .put(gw.url("/big"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let chunked = b"POST /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n\
        8\r\nchunked-\r\n4\r\nbody\r\n0\r\n\r\n";
    let port = gw.port;
    let (answer, _) = tokio::task::spawn_blocking(move || raw(port, chunked))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    eventually(Duration::from_secs(10), "every copy answered", || async {
        mirror_count(&c, &gw, "ok").await == 202
    })
    .await;
    let seen = shadow.seen();
    for i in 0..200 {
        let s = seen
            .iter()
            .find(|s| s.path == format!("/b/{i}"))
            .expect("copy arrived");
        assert_eq!(s.body, format!("body-{i}-").repeat(1 + i % 40).as_bytes());
    }
    let find = |path: &str| seen.iter().find(|s| s.path == path).map(|s| s.body.clone());
    assert!(find("/big").is_some_and(|b| b == big), "large body differs");
    assert_eq!(find("/chunked").as_deref(), Some(&b"chunked-body"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_mirror_fails_copies_but_never_the_primary() {
    let primary = Backend::start("primary").await;
    let mirror = RawMirror::start(Mode::Broken).await;
    let gw = Gateway::start(&conf(&primary, &mirror.addr.to_string(), ", timeout: 5s"));
    let c = client();
    many_gets(&c, &gw, 300, 16).await; // every primary answer is a 200
                                       // Every copy ends, one way or the other, and none is left in flight.
    eventually(
        Duration::from_secs(10),
        "every copy accounted for",
        || async {
            let (ok, error) = (
                mirror_count(&c, &gw, "ok").await,
                mirror_count(&c, &gw, "error").await,
            );
            ok + error == 300 && ok > 0 && error > 0
        },
    )
    .await;
    let metrics = metrics_text(&c, &gw).await;
    assert!(
        metrics.contains("fanout_mirror_inflight{route=\"mirrored\",upstream=\"shadow\"} 0"),
        "{metrics}"
    );
    assert_eq!(get(&c, &gw.url("/after")).await.0, 200);
}
