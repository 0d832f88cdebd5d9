//! Mirror comparison: a primary and a candidate that answer alike on some paths and differ
//! on others; each comparison lands in its result, `/mirror/diffs` shows the differing pairs
//! (both statuses, body excerpts, never a redacted value), and the client always gets the
//! primary's answer, unchanged and undelayed by a slow candidate.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A server answering per path; `candidate` picks the candidate's variant.
async fn server(candidate: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_string();
                    // Read the whole request body first, so the connection stays reusable.
                    req.into_body()
                        .collect()
                        .await
                        .map_err(std::io::Error::other)?;
                    Ok::<_, std::io::Error>(answer(&path, candidate).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

type Body = BoxBody<Bytes, std::convert::Infallible>;

async fn answer(path: &str, candidate: bool) -> Response<Body> {
    let text = |body: &str| ("text/plain", body.to_string());
    let json = |body: &str| ("application/json", body.to_string());
    let pick = |p: &str, c: &str| {
        if candidate {
            c.to_string()
        } else {
            p.to_string()
        }
    };
    let mut status = 200;
    let mut extra: Vec<(&str, String)> =
        vec![("x-v", "1".into()), ("x-request-id", pick("p", "c"))];
    let (ctype, body) = match path {
        "/same" => text("hello"),
        "/status" => {
            if candidate {
                status = 500;
            }
            text("hello")
        }
        "/header" => {
            extra[0].1 = pick("1", "2");
            text("hello")
        }
        "/body" => text(&pick("hello", "hellp")),
        "/json-order" => json(&pick(r#"{"a":1,"b":[1,2]}"#, r#"{"b":[1,2],"a":1}"#)),
        "/json-ignored" => json(&pick(
            r#"{"a":1,"meta":{"generated_at":1},"items":[{"id":1,"n":"x"}]}"#,
            r#"{"items":[{"n":"x","id":7}],"a":1,"meta":{"generated_at":2}}"#,
        )),
        "/json-differs" => json(&pick(r#"{"a":1}"#, r#"{"a":2}"#)),
        "/long" => {
            // Differs only after max_body (1 KiB): compared as alike.
            let mut b = "x".repeat(2000);
            if candidate {
                b.replace_range(1500..1501, "y");
            }
            text(&b)
        }
        "/secret" => {
            extra.push(("x-api-key", pick("primary-secret", "candidate-secret")));
            text("hello")
        }
        "/chunked" => {
            // A body of unknown length (sent chunked) whose second piece differs.
            let pieces = ["first piece, ", if candidate { "second" } else { "Second" }];
            let frames = pieces.map(|p| Ok(hyper::body::Frame::data(Bytes::from(p))));
            let body = StreamBody::new(futures_util::stream::iter(frames));
            return Response::builder()
                .header("content-type", "text/plain")
                .header("x-v", "1")
                .body(BodyExt::boxed(body))
                .unwrap();
        }
        "/slow" => {
            if candidate {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            text("hello")
        }
        _ => text("?"),
    };
    let mut b = Response::builder()
        .status(status)
        .header("content-type", ctype);
    for (k, v) in extra {
        b = b.header(k, v);
    }
    b.body(Full::new(Bytes::from(body)).boxed()).unwrap()
}

fn series(result: &str) -> String {
    format!(
        "fanout_mirror_compare_total{{result=\"{result}\",route=\"api\",upstream=\"candidate\"}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_comparison_lands_in_its_result_and_differing_pairs_are_kept() {
    let (primary, candidate) = (server(false).await, server(true).await);
    let gw = Gateway::start(&format!(
        "upstreams:\n  primary: {{ backends: [{primary}] }}\n  candidate: {{ backends: [{candidate}] }}\n\
         routes:\n  - name: api\n    match: {{ prefix: / }}\n    upstream: primary\n    mirror:\n      \
         - upstream: candidate\n        timeout: 5s\n        compare:\n          \
         ignore_headers: [X-Request-Id, Date]\n          \
         ignore_json_fields: [meta.generated_at, items.*.id]\n          \
         max_body: 1KiB\n          keep: 100\n"
    ));
    let c = client();
    let paths = [
        ("/same", "match"),
        ("/status", "status"),
        ("/header", "headers"),
        ("/body", "body"),
        ("/json-order", "match"),
        ("/json-ignored", "match"),
        ("/json-differs", "body"),
        ("/long", "match"),
        ("/chunked", "body"),
        ("/secret", "headers"),
    ];
    // Each path three ways: without a body and with a small one (copies pipelined on the
    // mirror's lanes, their answers read by the lane reader), and with a body too long
    // for a lane (copies streamed through the connector).
    let bodies = [None, Some(100), Some(100_000)];
    for body in bodies {
        for (path, _) in paths {
            let r = match body {
                None => c.get(gw.url(path)),
                Some(n) => c.post(gw.url(path)).body(vec![b'b'; n]),
            };
            let r = r.send().await.unwrap();
            // The client gets the primary's answer, unchanged.
            assert_eq!(r.status(), 200, "{path}");
            assert_eq!(r.headers()["x-v"], "1", "{path}");
            let text = r.text().await.unwrap();
            assert!(
                !text.contains("hellp") && !text.contains('y') && !text.contains("second"),
                "{path}: {text}"
            );
        }
    }
    let want =
        |result: &str| (bodies.len() * paths.iter().filter(|(_, r)| *r == result).count()) as u64;
    eventually(
        Duration::from_secs(10),
        "every comparison counted",
        || async {
            let mut total = 0;
            for r in ["match", "status", "headers", "body"] {
                total += metric(&c, &gw, &series(r)).await;
            }
            total == (bodies.len() * paths.len()) as u64
        },
    )
    .await;
    for r in ["match", "status", "headers", "body"] {
        assert_eq!(metric(&c, &gw, &series(r)).await, want(r), "{r}");
    }
    assert_eq!(metric(&c, &gw, &series("incomplete")).await, 0);

    let diffs = admin_json(&c, &gw, "/mirror/diffs").await;
    let diffs = diffs.as_array().expect("a list");
    assert_eq!(diffs.len(), 6 * bodies.len(), "{diffs:?}");
    // Newest first: the last differing request is /secret.
    assert_eq!(diffs[0]["path"], "/secret");
    assert_eq!(diffs[0]["method"], "POST");
    let chunked = diffs.iter().find(|d| d["path"] == "/chunked").unwrap();
    assert_eq!(chunked["primary"]["body"], "first piece, Second");
    assert_eq!(chunked["mirror"]["body"], "first piece, second");
    let text = serde_json::to_string(diffs).unwrap();
    assert!(
        !text.contains("primary-secret") && !text.contains("candidate-secret"),
        "{text}"
    );
    let status = diffs.iter().find(|d| d["path"] == "/status").unwrap();
    assert_eq!(status["result"], "status");
    assert_eq!(status["primary"]["status"], 200);
    assert_eq!(status["mirror"]["status"], 500);
    let body = diffs.iter().find(|d| d["path"] == "/body").unwrap();
    assert_eq!(body["primary"]["body"], "hello");
    assert_eq!(body["mirror"]["body"], "hellp");
    assert_eq!(body["route"], "api");
    assert_eq!(body["upstream"], "candidate");
    assert!(body["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    let header = diffs.iter().find(|d| d["path"] == "/header").unwrap();
    assert_eq!(header["headers"][0]["name"], "x-v");
    assert_eq!(header["headers"][0]["primary"], "1");
    assert_eq!(header["headers"][0]["mirror"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_candidate_delays_nothing_and_a_dead_one_is_incomplete() {
    let (primary, candidate) = (server(false).await, server(true).await);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = Gateway::start(&format!(
        "upstreams:\n  primary: {{ backends: [{primary}] }}\n  candidate: {{ backends: [{candidate}] }}\n  \
         dead: {{ backends: [{dead}] }}\n\
         routes:\n  - name: api\n    match: {{ prefix: /slow }}\n    upstream: primary\n    \
         mirror: [{{ upstream: candidate, timeout: 5s, compare: {{ max_body: 1KiB, ignore_headers: [X-Request-Id] }} }}]\n\
         \x20 - name: gone\n    match: {{ prefix: /same }}\n    upstream: primary\n    \
         mirror: [{{ upstream: dead, compare: {{}} }}]\n"
    ));
    let c = client();
    let started = Instant::now();
    let r = c.get(gw.url("/slow")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    eventually(
        Duration::from_secs(10),
        "the comparison counted",
        || async { metric(&c, &gw, &series("match")).await > 0 },
    )
    .await;
    let counted = metric(&c, &gw, &series("match")).await;
    assert_eq!(counted, 1, "{}", metrics_text(&c, &gw).await);
    c.get(gw.url("/same")).send().await.unwrap();
    let gone =
        "fanout_mirror_compare_total{result=\"incomplete\",route=\"gone\",upstream=\"dead\"}";
    eventually(
        Duration::from_secs(10),
        "the dead mirror's comparison counted",
        || async { metric(&c, &gw, gone).await == 1 },
    )
    .await;
}
