//! Strict framing (RFC 9112) at the edge, over raw TCP: every malformed or ambiguous
//! request of the table gets its 4xx (or 505) and a closed connection, and a raw backend
//! that records every byte it receives sees none of them; each row's well-formed twin goes
//! through. Then the slow-client defences: a head that dribbles gets 408, a silent
//! connection and an idle keep-alive one are closed, and connection limits refuse.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;

/// One row: why the request is refused, its bytes (with `{P}` for its path), its
/// well-formed twin, and the status the bad one gets.
struct Row {
    why: &'static str,
    bad: &'static [u8],
    good: &'static [u8],
    status: u16,
}

const fn row(why: &'static str, bad: &'static [u8], good: &'static [u8]) -> Row {
    Row {
        why,
        bad,
        good,
        status: 400,
    }
}

const GET: &[u8] = b"GET {P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
const POST5: &[u8] =
    b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
const CHUNKED: &[u8] = b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";

fn table() -> Vec<Row> {
    let mut rows = vec![
        // Request line (RFC 9112 §3).
        row("CR inside the request-target", b"GET {P}\rx HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("NUL inside the request-target", b"GET {P}\0x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("LF inside the request-target", b"GET {P}\nx HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("HTAB inside the request-target", b"GET {P}\tx HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("SP inside the request-target", b"GET {P} x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("two spaces after the method", b"GET  {P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("two spaces before the version", b"GET {P}  HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("space after the version", b"GET {P} HTTP/1.1 \r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("request line ends in a bare LF", b"GET {P} HTTP/1.1\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("request line ends in CR CR LF", b"GET {P} HTTP/1.1\r\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("lower-case HTTP name", b"GET {P} http/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("junk after the version", b"GET {P} HTTP/1.1x\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("HTTP/0.9 request line", b"GET {P}\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("control character in the method", b"G\x01T {P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("HTAB as a request-line separator", b"GET\t{P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("space before the method", b" GET {P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("target in no valid form", b"GET x{P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("asterisk-form with GET", b"GET * HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-P: {P}\r\n\r\n", GET),
        row("authority-form (CONNECT)", b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-P: {P}\r\n\r\n", GET),
        row("fragment in the request-target", b"GET {P}#frag HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", GET),
        row("absolute-form with a non-HTTP scheme", b"GET ftp://a{P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", b"GET http://a{P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
        row("absolute-form naming another host than Host", b"GET http://b{P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", b"GET http://a{P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
        row("bare LF before the request line", b"\nGET {P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", b"\r\nGET {P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
        // Host (§3.2).
        row("HTTP/1.1 without Host", b"GET {P} HTTP/1.1\r\nConnection: close\r\n\r\n", GET),
        row("two Host fields", b"GET {P} HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n", GET),
        row("two Host fields on HTTP/1.0", b"GET {P} HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", b"GET {P} HTTP/1.0\r\nHost: a\r\n\r\n"),
        row("space inside Host", b"GET {P} HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n", GET),
        row("slash inside Host", b"GET {P} HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n", GET),
        // Field lines (§5).
        row("space between a field name and its colon", b"GET {P} HTTP/1.1\r\nHost : a\r\nConnection: close\r\n\r\n", GET),
        row("HTAB between a field name and its colon", b"GET {P} HTTP/1.1\r\nHost\t: a\r\nConnection: close\r\n\r\n", GET),
        row("empty field name", b"GET {P} HTTP/1.1\r\nHost: a\r\n: x\r\nConnection: close\r\n\r\n", GET),
        row("space inside a field name", b"GET {P} HTTP/1.1\r\nHost: a\r\nX Y: z\r\nConnection: close\r\n\r\n", GET),
        row("obs-fold with SP", b"GET {P} HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\nConnection: close\r\n\r\n", GET),
        row("obs-fold with HTAB", b"GET {P} HTTP/1.1\r\nHost: a\r\nX: y\r\n\tz\r\nConnection: close\r\n\r\n", GET),
        row("NUL in a field value", b"GET {P} HTTP/1.1\r\nHost: a\r\nX: y\0z\r\nConnection: close\r\n\r\n", GET),
        row("bare CR in a field value", b"GET {P} HTTP/1.1\r\nHost: a\r\nX: y\rz\r\nConnection: close\r\n\r\n", GET),
        row("bare LF ending a field line", b"GET {P} HTTP/1.1\r\nHost: a\r\nX: y\nConnection: close\r\n\r\n", GET),
        row("DEL in a field value", b"GET {P} HTTP/1.1\r\nHost: a\r\nX: y\x7fz\r\nConnection: close\r\n\r\n", GET),
        row("control character in a field value", b"GET {P} HTTP/1.1\r\nHost: a\r\nX: y\x01z\r\nConnection: close\r\n\r\n", GET),
        row("NUL in a field name", b"GET {P} HTTP/1.1\r\nHost: a\r\nX\0: y\r\nConnection: close\r\n\r\n", GET),
        row("non-token character in a field name", b"GET {P} HTTP/1.1\r\nHost: a\r\nX(: y\r\nConnection: close\r\n\r\n", GET),
        row("field line without a colon", b"GET {P} HTTP/1.1\r\nHost: a\r\nXyz\r\nConnection: close\r\n\r\n", GET),
        row("header section ends in LF LF", b"GET {P} HTTP/1.1\r\nHost: a\r\nConnection: close\n\n", GET),
        row("header section ends in CR LF LF", b"GET {P} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\n", GET),
        // Content-Length (§6.3, RFC 9110 §8.6).
        row("Content-Length as a list", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello", POST5),
        row("two equal Content-Lengths", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", POST5),
        row("two different Content-Lengths", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello!", POST5),
        row("Content-Length with a sign", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\nConnection: close\r\n\r\nhello", POST5),
        row("negative Content-Length", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\nConnection: close\r\n\r\nhello", POST5),
        row("hexadecimal Content-Length", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\nConnection: close\r\n\r\nhello", POST5),
        row("two numbers in one Content-Length", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\nConnection: close\r\n\r\nhello", POST5),
        row("empty Content-Length", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: \r\nConnection: close\r\n\r\nhello", POST5),
        row("Content-Length beyond 64 bits", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\nConnection: close\r\n\r\nhello", POST5),
        row("space before the Content-Length colon", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\nConnection: close\r\n\r\nhello", POST5),
        row("decimal point in Content-Length", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5.0\r\nConnection: close\r\n\r\nhello", POST5),
        // Transfer-Encoding (§6.1, §7).
        row("two chunked Transfer-Encoding fields", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("chunked listed twice", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("gzip before chunked", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("chunked not last", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("identity transfer coding", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("unknown transfer coding", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("truncated chunked", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunk\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("quoted chunked", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("Transfer-Encoding then Content-Length", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("Content-Length then Transfer-Encoding", b"POST {P} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("space before the Transfer-Encoding colon", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("vertical tab after chunked", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\x0b\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("Transfer-Encoding on HTTP/1.0", b"POST {P} HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"POST {P} HTTP/1.0\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"),
        // Chunked bodies (§7.1).
        row("non-hex chunk size", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\ng\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("negative chunk size", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("whitespace after the chunk size", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("whitespace before the chunk size", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n 5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("0x prefix on the chunk size", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("chunk size of 17 digits", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n00000000000000005\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("bare LF after a chunk extension", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;a\nhello\r\n0\r\n\r\n", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;a\r\nhello\r\n0\r\n\r\n"),
        row("bare CR inside a chunk extension", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;a=b\r\nhello\r\n0\r\n\r\n"),
        row("NUL inside a chunk extension", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;a=\0\r\nhello\r\n0\r\n\r\n", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;a=\"\"\r\nhello\r\n0\r\n\r\n"),
        row("unterminated quoted chunk extension", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;a=\"b\r\nhello\r\n0\r\n\r\n", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5 ; a = \"b\\\"c\"\r\nhello\r\n0\r\n\r\n"),
        row("chunk data longer than its size", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("chunk data shorter than its size", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n6\r\nhello\r\n0\r\n\r\n", CHUNKED),
        row("chunk data ends in a bare LF", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\n0\r\n\r\n", CHUNKED),
        row("chunk size line ends in a bare LF", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\nhello\r\n0\r\n\r\n", CHUNKED),
        row("space before a trailer field's colon", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX : y\r\n\r\n", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX: y\r\n\r\n"),
        row("obs-fold in the trailer section", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX: y\r\n z\r\n\r\n", b"POST {P} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX: y z\r\n\r\n"),
    ];
    // Versions and limits have answers of their own.
    for (why, bad, status) in [
        (
            "HTTP/1.2",
            &b"GET {P} HTTP/1.2\r\nHost: a\r\nConnection: close\r\n\r\n"[..],
            505,
        ),
        (
            "HTTP/2.0 on an HTTP/1 connection",
            b"GET {P} HTTP/2.0\r\nHost: a\r\nConnection: close\r\n\r\n",
            505,
        ),
    ] {
        rows.push(Row {
            why,
            bad,
            good: GET,
            status,
        });
    }
    rows
}

fn status_of(answer: &str) -> u16 {
    answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

async fn raw_async(port: u16, bytes: Vec<u8>) -> (String, bool) {
    tokio::task::spawn_blocking(move || raw(port, &bytes))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ambiguous_request_is_refused_and_its_twin_passes() {
    let backend = RawBackend::start().await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        backend.addr
    ));
    let rows = table();
    assert!(rows.len() >= 60, "{} rows", rows.len());
    for (i, r) in rows.iter().enumerate() {
        let (answer, closed) = raw_async(gw.port, fill(r.bad, &format!("/bad/{i}"))).await;
        assert_eq!(
            status_of(&answer),
            r.status,
            "row {i} ({}): {answer:?}",
            r.why
        );
        assert!(closed, "row {i} ({}): connection left open", r.why);
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "row {i}"
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let (answer, _) = raw_async(gw.port, fill(r.good, &format!("/good/{i}"))).await;
        assert_eq!(
            status_of(&answer),
            200,
            "twin of row {i} ({}): {answer:?}",
            r.why
        );
    }
    // Every twin arrived (sent after all the refused rows), and no refused row did.
    let received = backend.received();
    for i in 0..rows.len() {
        assert!(
            received.contains(&format!("/good/{i} ")),
            "twin {i} missing"
        );
    }
    assert!(
        !received.contains("/bad/"),
        "a refused request reached the backend:\n{received}"
    );
    let c = client();
    let refused = metric(
        &c,
        &gw,
        "fanout_client_refused_total{reason=\"bad_request\"}",
    )
    .await;
    assert_eq!(refused, rows.len() as u64);
    // The edge's answers count as requests too (of no route).
    for status in [400, 505] {
        let answered = rows.iter().filter(|r| r.status == status).count() as u64;
        let series = format!("fanout_requests_total{{route=\"none\",status=\"{status}\"}}");
        assert_eq!(metric(&c, &gw, &series).await, answered, "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_on_the_head_answer_414_and_431() {
    let backend = RawBackend::start().await;
    let gw = Gateway::start(&format!(
        "clients: {{ max_request_line: 1KiB, max_header_bytes: 4KiB, max_headers: 20 }}\n\
         upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        backend.addr
    ));
    let long_target = format!("GET /bad/{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(1100));
    let many = format!(
        "GET /bad/many HTTP/1.1\r\nHost: a\r\n{}\r\n",
        "X-A: 1\r\n".repeat(20)
    );
    let large = format!(
        "GET /bad/large HTTP/1.1\r\nHost: a\r\nX-A: {}\r\n\r\n",
        "b".repeat(4100)
    );
    for (bytes, status) in [(long_target, 414), (many, 431), (large, 431)] {
        let (answer, closed) = raw_async(gw.port, bytes.into_bytes()).await;
        assert_eq!(status_of(&answer), status, "{answer}");
        assert!(closed);
    }
    let fits = format!(
        "GET /good/{} HTTP/1.1\r\nHost: a\r\n{}Connection: close\r\n\r\n",
        "a".repeat(900),
        "X-A: 1\r\n".repeat(18)
    );
    let (answer, _) = raw_async(gw.port, fits.into_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(!backend.received().contains("/bad/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_framed_one_by_one() {
    let backend = RawBackend::start().await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        backend.addr
    ));
    // Two good requests then a smuggling attempt, in one write: the first two are
    // answered, the third refused, and the backend never sees it.
    let bytes = b"POST /good/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
GET /good/2 HTTP/1.1\r\nHost: a\r\n\r\n\
POST /bad/3 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        .to_vec();
    let (answer, closed) = raw_async(gw.port, bytes).await;
    assert!(closed, "{answer}");
    let statuses: Vec<u16> = answer
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| answer.get(i + 9..i + 12)?.parse().ok())
        .collect();
    assert_eq!(statuses, vec![200, 200, 400], "{answer}");
    let received = backend.received();
    assert!(received.contains("/good/1 ") && received.contains("/good/2 "));
    assert!(!received.contains("/bad/"), "{received}");
}

/// Connects and sends `bytes`, then waits (at most `limit`) for the server to answer or
/// close; returns what came back and how long it took.
fn wait_for_server(port: u16, bytes: &[u8], limit: Duration) -> (String, Duration, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    let started = Instant::now();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    // A close with unread bytes in the server's buffer arrives as a reset.
    let closed = match s.read_to_end(&mut out) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
        closed,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_silent_and_idle_clients_are_cut_off() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&format!(
        "clients: {{ header_timeout: 1s, keepalive_timeout: 1s, body_timeout: 1s }}\n\
         upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        b.addr
    ));
    let port = gw.port;
    let limit = Duration::from_secs(5);
    // A head that dribbles: one byte every 300 ms never completes within 1 s.
    let dribble = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let started = Instant::now();
        let mut out = Vec::new();
        for byte in b"GET /slow HTTP/1.1\r\nHost: a\r\n".iter().cycle() {
            if s.write_all(&[*byte]).is_err() {
                break;
            }
            let mut buf = [0u8; 512];
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            assert!(started.elapsed() < Duration::from_secs(5), "never cut off");
        }
        (
            String::from_utf8_lossy(&out).into_owned(),
            started.elapsed(),
        )
    });
    // A connection that sends nothing is closed without an answer.
    let silent = tokio::task::spawn_blocking(move || wait_for_server(port, b"", limit));
    // A keep-alive connection idle after its answer is closed too.
    let idle = tokio::task::spawn_blocking(move || {
        wait_for_server(port, b"GET /idle HTTP/1.1\r\nHost: a\r\n\r\n", limit)
    });
    // A body that stalls half-way gets 408.
    let stalled = tokio::task::spawn_blocking(move || {
        wait_for_server(
            port,
            b"POST /stall HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello",
            limit,
        )
    });
    let (answer, took) = dribble.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let (answer, took, closed) = silent.await.unwrap();
    assert!(closed && answer.is_empty(), "{answer:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let (answer, took, closed) = idle.await.unwrap();
    assert!(closed && answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let (answer, _, closed) = stalled.await.unwrap();
    assert!(closed && answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(b
        .seen()
        .iter()
        .all(|s| s.path != "/slow" && s.path != "/stall"));
    let c = client();
    let series = |r: &str| format!("fanout_client_refused_total{{reason=\"{r}\"}}");
    assert_eq!(metric(&c, &gw, &series("header_timeout")).await, 2);
    assert_eq!(metric(&c, &gw, &series("body_timeout")).await, 1);
}

/// Opens a connection and proves it admitted by one answered request.
fn admitted(port: u16, i: usize) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /held/{i} HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s
}

async fn limits_refuse(clients: &str, reason: &str) {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&format!(
        "clients: {clients}\nupstreams:\n  u: {{ backends: [{}] }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        b.addr
    ));
    let c = client();
    let gauge = format!(
        "fanout_client_connections{{listener=\"127.0.0.1:{}\"}}",
        gw.port
    );
    let port = gw.port;
    // The connections that probed for the listener have gone.
    eventually(Duration::from_secs(5), "no connection open", || async {
        metric(&c, &gw, &gauge).await == 0
    })
    .await;
    let mut held: Vec<TcpStream> = (0..2).map(|i| admitted(port, i)).collect();
    assert_eq!(metric(&c, &gw, &gauge).await, 2);
    // One more is closed at once, unanswered, and counted.
    let (answer, _, closed) = wait_for_server(
        port,
        b"GET /over HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(closed && answer.is_empty(), "{answer:?}");
    let series = format!("fanout_client_refused_total{{reason=\"{reason}\"}}");
    assert_eq!(metric(&c, &gw, &series).await, 1);
    // A closed connection gives its slot back.
    drop(held.pop());
    eventually(Duration::from_secs(5), "the slot given back", || async {
        metric(&c, &gw, &gauge).await == 1
    })
    .await;
    held.push(admitted(port, 2));
    assert!(b.seen().iter().all(|s| s.path != "/over"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_at_accept() {
    limits_refuse("{ max_connections: 2 }", "max_connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_ip_refuses_at_accept() {
    limits_refuse(
        "{ max_connections: 100, max_connections_per_ip: 2 }",
        "max_connections_per_ip",
    )
    .await;
}
