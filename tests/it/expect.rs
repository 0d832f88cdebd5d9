//! `Expect: 100-continue`: the gateway answers `100` itself once the request is admitted,
//! refuses with 413 or 417 without reading the body, and the backend never waits for it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;

/// Sends a head, then reads what comes within `wait`.
fn head_then_read(port: u16, head: &str, wait: Duration) -> (TcpStream, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    (s, String::from_utf8_lossy(&buf[..n]).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_once_admitted() {
    let backend = Backend::start("app").await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  app: {{ backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: app, max_body_bytes: 1000 }}\n",
        backend.addr
    ));
    let port = gw.port;
    let (status_line, answer, seen) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let (mut s, first) = head_then_read(
            port,
            "POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
            Duration::from_millis(100),
        );
        assert!(
            first.starts_with("HTTP/1.1 100 Continue\r\n"),
            "no 100 within 100 ms ({:?}): {first:?}",
            started.elapsed()
        );
        s.write_all(b"hello").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&rest).contains("\r\n\r\napp") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&rest).to_string();
        (text.lines().next().unwrap_or("").to_string(), text, first)
    })
    .await
    .unwrap();
    assert_eq!(status_line, "HTTP/1.1 200 OK", "{answer}");
    let got = backend.seen();
    assert_eq!(got[0].body.as_ref(), b"hello");
    assert!(!got[0].headers.contains_key("expect"), "{seen}");

    // Over the limit by Content-Length: 413 at once, no 100, body never read.
    let (_, first) = tokio::task::spawn_blocking(move || {
        head_then_read(
            port,
            "POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap();
    assert!(first.starts_with("HTTP/1.1 413"), "{first}");
    // An expectation the gateway cannot meet: 417.
    let (_, first) = tokio::task::spawn_blocking(move || {
        head_then_read(
            port,
            "POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: teapot\r\n\r\n",
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap();
    assert!(first.starts_with("HTTP/1.1 417"), "{first}");
    assert_eq!(backend.hits(), 1);
}
