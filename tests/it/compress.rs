//! Response compression: each algorithm decoded by its own crate on the client side, the
//! choice by `Accept-Encoding` and the route's order, the answers that must stay as they
//! are, a streamed answer of unknown length, and the compressed and identity variants in
//! the cache.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// A 20 KiB JSON document, as an API would answer.
fn document() -> String {
    let items: Vec<String> = (0..200)
        .map(|i| {
            format!("{{\"id\":{i},\"name\":\"item {i}\",\"tags\":[\"a\",\"b\"],\"price\":{i}.5}}")
        })
        .collect();
    let mut doc = format!("{{\"items\":[{}]}}", items.join(","));
    while doc.len() < 20 * 1024 {
        doc.push(' ');
    }
    doc
}

fn decode(coding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::decode_all(body).unwrap(),
        other => panic!("{other}"),
    }
    out
}

/// An origin answering `path`-independent JSON (with an ETag), or what `special` says for
/// the paths it knows.
async fn json_origin() -> Origin {
    let doc = document();
    Origin::start(
        Arc::new(move |req: &http::request::Parts| {
            let json = |extra: &[(&str, &str)]| {
                let mut h = vec![
                    ("content-type".to_string(), "application/json".to_string()),
                    ("etag".to_string(), "\"doc-1\"".to_string()),
                ];
                h.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
                h
            };
            match req.uri.path() {
                "/png" => (
                    200,
                    vec![("content-type".into(), "image/png".into())],
                    doc.clone(),
                ),
                "/small" => (200, json(&[]), "{\"a\":1}".into()),
                "/no-transform" => (200, json(&[("cache-control", "no-transform")]), doc.clone()),
                "/encoded" => (
                    200,
                    json(&[("content-encoding", "identity-ish")]),
                    doc.clone(),
                ),
                "/empty" => (204, vec![], String::new()),
                "/cached" => (200, json(&[("cache-control", "max-age=600")]), doc.clone()),
                _ => (200, json(&[]), doc.clone()),
            }
        }),
        Duration::ZERO,
    )
    .await
}

fn route(origin_addr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "upstreams:\n  o: {{ backends: [{origin_addr}] }}\nroutes:\n\
         \x20 - match: {{ prefix: / }}\n    upstream: o\n    compress: {{ algorithms: [zstd, br, gzip], min_size: 1KiB }}\n{extra}"
    )
}

async fn get_with(
    c: &reqwest::Client,
    url: &str,
    ae: Option<&str>,
) -> (reqwest::header::HeaderMap, Vec<u8>, u16) {
    let mut r = c.get(url);
    if let Some(ae) = ae {
        r = r.header("accept-encoding", ae);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (headers, resp.bytes().await.unwrap().to_vec(), status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_algorithm_is_chosen_by_accept_encoding_and_decodes() {
    let origin = json_origin().await;
    let gw = Gateway::start(&route(origin.addr, ""));
    let c = client();
    let doc = document();
    for (ae, coding) in [
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip, br, zstd", "zstd"),
        ("gzip;q=0.5, br;q=0, zstd;q=0", "gzip"),
        ("*", "zstd"),
        ("*;q=0.2, zstd;q=0", "br"),
    ] {
        let (h, body, status) = get_with(&c, &gw.url("/doc"), Some(ae)).await;
        assert_eq!(status, 200);
        assert_eq!(h["content-encoding"], coding, "{ae}");
        assert_eq!(h["vary"], "Accept-Encoding");
        assert_eq!(h["etag"], "W/\"doc-1\"");
        assert!(h.get("content-length").is_none());
        assert!(body.len() < doc.len() / 3, "{coding}: {} bytes", body.len());
        assert_eq!(decode(coding, &body), doc.as_bytes(), "{ae}");
    }
    for ae in [None, Some("identity"), Some("gzip;q=0")] {
        let (h, body, _) = get_with(&c, &gw.url("/doc"), ae).await;
        assert!(h.get("content-encoding").is_none(), "{ae:?}");
        assert_eq!(h["vary"], "Accept-Encoding");
        assert_eq!(h["etag"], "\"doc-1\"");
        assert_eq!(body, doc.as_bytes());
    }
    assert_eq!(
        metric(
            &c,
            &gw,
            "fanout_compressed_responses_total{algorithm=\"zstd\",route=\"prefix:/\"}"
        )
        .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_must_stay_as_it_is_is_not_compressed() {
    let origin = json_origin().await;
    let gw = Gateway::start(&route(origin.addr, ""));
    let c = client();
    let doc = document();
    for path in ["/png", "/small", "/no-transform", "/encoded"] {
        let (h, body, _) = get_with(&c, &gw.url(path), Some("gzip, br, zstd")).await;
        let ce = h.get("content-encoding").map(|v| v.to_str().unwrap());
        assert!(ce.is_none() || ce == Some("identity-ish"), "{path}: {ce:?}");
        if path != "/small" {
            assert_eq!(body, doc.as_bytes(), "{path}");
        }
    }
    let (h, _, status) = get_with(&c, &gw.url("/empty"), Some("gzip")).await;
    assert_eq!(status, 204);
    assert!(h.get("content-encoding").is_none());
    // HEAD, and a request for a range.
    let r = c
        .head(gw.url("/doc"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("content-encoding").is_none());
    let r = c
        .get(gw.url("/doc"))
        .header("accept-encoding", "gzip")
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("content-encoding").is_none());
    // A route without `compress` is untouched.
    let plain = Gateway::start(&format!(
        "upstreams:\n  o: {{ backends: [{}] }}\nroutes:\n  - match: {{ prefix: / }}\n    upstream: o\n",
        origin.addr
    ));
    let (h, body, _) = get_with(&c, &plain.url("/doc"), Some("gzip")).await;
    assert!(h.get("content-encoding").is_none());
    assert!(h.get("vary").is_none());
    assert_eq!(body, doc.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_of_unknown_length_is_compressed_as_it_streams() {
    // A raw origin that streams text in chunks, with a pause, and no Content-Length.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let line = "a line of event text that repeats itself\n".repeat(100);
    let sent = line.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let part = sent.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await;
                for _ in 0..3 {
                    let chunk = format!("{:x}\r\n{part}\r\n", part.len());
                    let _ = s.write_all(chunk.as_bytes()).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    let gw = Gateway::start(&route(addr, ""));
    let c = client();
    let (h, body, _) = get_with(&c, &gw.url("/stream"), Some("gzip")).await;
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(decode("gzip", &body), line.repeat(3).as_bytes());
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_and_identity_answers_are_separate_cache_variants() {
    let origin = json_origin().await;
    let gw = Gateway::start(&route(origin.addr, "    cache: {}\n"));
    let c = client();
    let doc = document();
    let cache = |h: &reqwest::header::HeaderMap| h["x-cache"].to_str().unwrap().to_string();
    let (h, body, _) = get_with(&c, &gw.url("/cached"), Some("gzip")).await;
    assert_eq!(
        (cache(&h).as_str(), h["content-encoding"].to_str().unwrap()),
        ("MISS", "gzip")
    );
    assert_eq!(decode("gzip", &body), doc.as_bytes());
    // Another text of Accept-Encoding that gets gzip is the same variant, stored compressed.
    let (h, body, _) = get_with(&c, &gw.url("/cached"), Some("deflate, gzip;q=0.8")).await;
    assert_eq!(cache(&h), "HIT");
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(decode("gzip", &body), doc.as_bytes());
    // A client that takes no coding never gets the gzip body.
    let (h, body, _) = get_with(&c, &gw.url("/cached"), None).await;
    assert_eq!(cache(&h), "MISS");
    assert!(h.get("content-encoding").is_none());
    assert_eq!(body, doc.as_bytes());
    let (h, body, _) = get_with(&c, &gw.url("/cached"), None).await;
    assert_eq!(cache(&h), "HIT");
    assert_eq!(body, doc.as_bytes());
    let (h, body, _) = get_with(&c, &gw.url("/cached"), Some("br")).await;
    assert_eq!(
        (cache(&h).as_str(), h["content-encoding"].to_str().unwrap()),
        ("MISS", "br")
    );
    assert_eq!(decode("br", &body), doc.as_bytes());
    assert_eq!(origin.hits(), 3, "one origin request per coding");
    // Hits are not compressed again: the counter counts the three fills only.
    for _ in 0..3 {
        let (h, _, _) = get_with(&c, &gw.url("/cached"), Some("gzip")).await;
        assert_eq!(cache(&h), "HIT");
    }
    let gzip = metric(
        &c,
        &gw,
        "fanout_compressed_responses_total{algorithm=\"gzip\",route=\"prefix:/\"}",
    )
    .await;
    assert_eq!(gzip, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_answers_go_over_http2_too() {
    let origin = json_origin().await;
    let body = route(origin.addr, "");
    let gw = Gateway::start_listening(
        |port| format!("[{{ address: \"127.0.0.1:{port}\", http2: true }}]"),
        &body,
    );
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2
        .get(gw.url("/doc"))
        .header("accept-encoding", "br")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.headers()["content-encoding"], "br");
    assert!(resp.headers().get("transfer-encoding").is_none());
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(decode("br", &bytes), document().as_bytes());
}
