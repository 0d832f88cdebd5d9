//! HTTP/2 at the edge, sent frame by frame by a raw client (`common::h2`): every malformed
//! or ambiguous request of the table (RFC 9113 §8.1–8.3, RFC 9110 §5.5) is refused (a 4xx,
//! a stream reset or a GOAWAY) and a raw backend that records every byte sees nothing of it,
//! while its well-formed twin goes through. Then the four ways HTTP/2 requests used to get
//! past the edge: a host route lost when the path was normalised, a malformed body and a
//! client's reset each turning into a retry, and limits that held for HTTP/1.1 only.

use std::time::Duration;

use crate::common::h2::{get, request, Fields, H2Conn, Outcome};
use crate::common::*;
use fanout::edge::framing::{Framer, Limits, Phase};

const HOST: &str = "routed.example";

/// A request as the client sends it: its fields (`{P}` in a value stands for the row's
/// path) and its body (`None`: END_STREAM on the HEADERS; `Some`: one DATA frame with it).
#[derive(Clone)]
struct Req {
    fields: Fields,
    body: Option<Vec<u8>>,
}

fn req(fields: Fields) -> Req {
    Req { fields, body: None }
}

fn f(name: &[u8], value: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (name.to_vec(), value.to_vec())
}

/// A GET of `{P}` plus `extra` fields.
fn plus(extra: &[(&[u8], &[u8])]) -> Req {
    let mut fields = get(HOST, "{P}");
    fields.extend(extra.iter().map(|(n, v)| f(n, v)));
    req(fields)
}

/// A GET of `{P}` with the pseudo-header `name` set to `value` (`None`: left out).
fn pseudo(name: &[u8], value: Option<&[u8]>) -> Req {
    let mut fields = get(HOST, "{P}");
    fields.retain(|(n, _)| n != name);
    if let Some(v) = value {
        let at = fields.len().min(3);
        fields.insert(at, f(name, v));
    }
    req(fields)
}

fn with_body(method: &str, extra: &[(&[u8], &[u8])], body: &[u8]) -> Req {
    let mut fields = request(method, HOST, "{P}");
    fields.extend(extra.iter().map(|(n, v)| f(n, v)));
    Req {
        fields,
        body: Some(body.to_vec()),
    }
}

struct Row {
    why: &'static str,
    bad: Req,
    good: Req,
    /// The status the bad request must get, where it is an answer and not a reset.
    status: Option<u16>,
}

fn row(why: &'static str, bad: Req, good: Req) -> Row {
    Row {
        why,
        bad,
        good,
        status: None,
    }
}

fn table() -> Vec<Row> {
    let ok = plus(&[(b"x-a", b"b")]);
    let many = |n: usize| -> Req {
        let mut r = get(HOST, "{P}");
        r.extend((0..n).map(|i| f(format!("x-f{i}").as_bytes(), b"v")));
        req(r)
    };
    let big = |n: usize| plus(&[(b"x-big", &vec![b'v'; n])]);
    let long_path = |n: usize| {
        pseudo(
            b":path",
            Some(format!("{{P}}/{}", "a".repeat(n)).as_bytes()),
        )
    };
    let mut no_authority = get(HOST, "{P}");
    no_authority.retain(|(n, _)| n != b":authority");
    let with_host = |host: &[u8]| {
        let mut r = no_authority.clone();
        r.push(f(b"host", host));
        req(r)
    };
    let mut pseudo_late = get(HOST, "{P}");
    pseudo_late.insert(2, f(b"x-a", b"b"));
    let empty_end = |method: &str| with_body(method, &[(b"content-length", b"0")], b"");
    let data_after_zero = |method: &str| with_body(method, &[(b"content-length", b"0")], b"x");
    let mut rows = vec![
        // Field names (RFC 9113 §8.2.1, RFC 9110 §5.1: a token, in lower case for h2).
        row(
            "upper-case field name",
            plus(&[(b"X-Upper", b"a")]),
            plus(&[(b"x-upper", b"a")]),
        ),
        row("space in a field name", plus(&[(b"x a", b"b")]), ok.clone()),
        // RFC 9113 §8.3.1: a scheme HTTP does not serve.
        row(
            ":scheme other than http and https",
            pseudo(b":scheme", Some(b"ftp")),
            pseudo(b":scheme", Some(b"https")),
        ),
        row(
            "quote in a field name (not a tchar)",
            plus(&[(b"x\"a", b"b")]),
            ok.clone(),
        ),
        row(
            "colon inside a field name",
            plus(&[(b"x:a", b"b")]),
            ok.clone(),
        ),
        row("empty field name", plus(&[(b"", b"b")]), ok.clone()),
        row("NUL in a field name", plus(&[(b"x\0a", b"b")]), ok.clone()),
        row(
            "non-ASCII byte in a field name",
            plus(&[(b"x\xffa", b"b")]),
            ok.clone(),
        ),
        row(
            "parenthesis in a field name (a delimiter)",
            plus(&[(b"x(a)", b"b")]),
            ok.clone(),
        ),
        // Field values (§8.2.1: no leading or trailing SP/HTAB; no CR, LF, NUL; RFC 9110 §5.5).
        row(
            "leading SP in a value",
            plus(&[(b"x-a", b" b")]),
            ok.clone(),
        ),
        row(
            "trailing SP in a value",
            plus(&[(b"x-a", b"b ")]),
            ok.clone(),
        ),
        row(
            "leading HTAB in a value",
            plus(&[(b"x-a", b"\tb")]),
            ok.clone(),
        ),
        row(
            "trailing HTAB in a value",
            plus(&[(b"x-a", b"b\t")]),
            ok.clone(),
        ),
        row(
            "a value that is one space",
            plus(&[(b"x-a", b" ")]),
            plus(&[(b"x-a", b"")]),
        ),
        row("CR in a value", plus(&[(b"x-a", b"a\rb")]), ok.clone()),
        row("LF in a value", plus(&[(b"x-a", b"a\nb")]), ok.clone()),
        row("NUL in a value", plus(&[(b"x-a", b"a\0b")]), ok.clone()),
        row("DEL in a value", plus(&[(b"x-a", b"a\x7fb")]), ok.clone()),
        row(
            "control character in a value",
            plus(&[(b"x-a", b"a\x01b")]),
            ok.clone(),
        ),
        // Connection-specific fields (§8.2.2).
        row(
            "connection field",
            plus(&[(b"connection", b"keep-alive")]),
            ok.clone(),
        ),
        row(
            "keep-alive field",
            plus(&[(b"keep-alive", b"timeout=5")]),
            ok.clone(),
        ),
        row(
            "proxy-connection field",
            plus(&[(b"proxy-connection", b"keep-alive")]),
            ok.clone(),
        ),
        row(
            "transfer-encoding field",
            plus(&[(b"transfer-encoding", b"chunked")]),
            ok.clone(),
        ),
        row(
            "upgrade field",
            plus(&[(b"upgrade", b"websocket")]),
            ok.clone(),
        ),
        row(
            "te other than trailers",
            plus(&[(b"te", b"gzip")]),
            plus(&[(b"te", b"trailers")]),
        ),
        row(
            "te listing more than trailers",
            plus(&[(b"te", b"trailers, gzip")]),
            plus(&[(b"te", b"trailers")]),
        ),
        // Pseudo-headers (§8.3).
        row(
            "pseudo-header after a regular field",
            req(pseudo_late),
            ok.clone(),
        ),
        row("two :method", plus(&[(b":method", b"GET")]), ok.clone()),
        row("two :path", plus(&[(b":path", b"/x")]), ok.clone()),
        row(
            "two :authority",
            plus(&[(b":authority", HOST.as_bytes())]),
            ok.clone(),
        ),
        row(
            "unknown pseudo-header",
            plus(&[(b":foo", b"bar")]),
            ok.clone(),
        ),
        row(
            "response pseudo-header in a request",
            plus(&[(b":status", b"200")]),
            ok.clone(),
        ),
        row(
            ":protocol without CONNECT",
            pseudo(b":protocol", Some(b"websocket")),
            ok.clone(),
        ),
        row("no :method", pseudo(b":method", None), ok.clone()),
        row("no :scheme", pseudo(b":scheme", None), ok.clone()),
        row("no :path", pseudo(b":path", None), ok.clone()),
        row("empty :path", pseudo(b":path", Some(b"")), ok.clone()),
        row(
            ":path not starting with /",
            pseudo(b":path", Some(b"x{P}")),
            ok.clone(),
        ),
        row(":path * with GET", pseudo(b":path", Some(b"*")), ok.clone()),
        row("SP in :path", pseudo(b":path", Some(b"{P} x")), ok.clone()),
        row(
            "absolute form in :path",
            pseudo(b":path", Some(b"http://routed.example{P}")),
            ok.clone(),
        ),
        row("CR in :path", pseudo(b":path", Some(b"{P}\rx")), ok.clone()),
        row("empty :method", pseudo(b":method", Some(b"")), ok.clone()),
        row(
            "SP in :method",
            pseudo(b":method", Some(b"GE T")),
            ok.clone(),
        ),
        row(
            "control character in :method",
            pseudo(b":method", Some(b"G\x01T")),
            ok.clone(),
        ),
        row(
            "CONNECT (authority form) to the gateway",
            req(vec![
                f(b":method", b"CONNECT"),
                f(b":authority", b"routed.example:443"),
                f(b"x-p", b"{P}"),
            ]),
            ok.clone(),
        ),
        // Paths that cannot be normalised safely (as for HTTP/1.1).
        row(
            ":path climbing above the root",
            pseudo(b":path", Some(b"/..{P}")),
            ok.clone(),
        ),
        row(
            ":path with ..; (Tomcat's ..)",
            pseudo(b":path", Some(b"{P}/..;/admin")),
            pseudo(b":path", Some(b"{P}/x;y/admin")),
        ),
        row(
            ":path with %2e%2e;",
            pseudo(b":path", Some(b"{P}/%2e%2e;/admin")),
            pseudo(b":path", Some(b"{P}/%2e%2ex;/admin")),
        ),
        row(
            ":path with .;",
            pseudo(b":path", Some(b"{P}/.;x/admin")),
            pseudo(b":path", Some(b"{P}/.x/admin")),
        ),
        row(
            "encoded slash in :path",
            pseudo(b":path", Some(b"{P}/a%2fb")),
            pseudo(b":path", Some(b"{P}/a%2Cb")),
        ),
        // Authority (§8.3.1, RFC 9110 §7.2).
        row(
            ":authority with userinfo",
            pseudo(b":authority", Some(b"u@routed.example")),
            ok.clone(),
        ),
        row(
            ":authority and host disagree",
            plus(&[(b"host", b"other.example")]),
            plus(&[(b"host", HOST.as_bytes())]),
        ),
        row(
            "two host fields",
            with_host(HOST.as_bytes()).tap_push(f(b"host", HOST.as_bytes())),
            with_host(HOST.as_bytes()),
        ),
        row(
            "neither :authority nor host",
            req(no_authority.clone()),
            with_host(HOST.as_bytes()),
        ),
        row(
            "space inside host",
            with_host(b"routed .example"),
            with_host(HOST.as_bytes()),
        ),
        // Content-Length (RFC 9110 §8.6, RFC 9113 §8.1.1).
        row(
            "content-length not a number",
            plus(&[(b"content-length", b"abc")]),
            plus(&[(b"content-length", b"0")]),
        ),
        row(
            "negative content-length",
            plus(&[(b"content-length", b"-1")]),
            plus(&[(b"content-length", b"0")]),
        ),
        row(
            "content-length with a sign",
            plus(&[(b"content-length", b"+0")]),
            plus(&[(b"content-length", b"0")]),
        ),
        row(
            "content-length with leading space",
            plus(&[(b"content-length", b" 0")]),
            plus(&[(b"content-length", b"0")]),
        ),
        row(
            "two content-length fields",
            plus(&[(b"content-length", b"0"), (b"content-length", b"0")]),
            plus(&[(b"content-length", b"0")]),
        ),
        row(
            "content-length as a list",
            plus(&[(b"content-length", b"0, 0")]),
            plus(&[(b"content-length", b"0")]),
        ),
        row(
            "content-length 0, then DATA (GET)",
            data_after_zero("GET"),
            empty_end("GET"),
        ),
        row(
            "content-length 0, then DATA (HEAD)",
            data_after_zero("HEAD"),
            empty_end("HEAD"),
        ),
        row(
            "content-length 0, then DATA (PUT)",
            data_after_zero("PUT"),
            empty_end("PUT"),
        ),
        row(
            "content-length 0, then DATA (DELETE)",
            data_after_zero("DELETE"),
            empty_end("DELETE"),
        ),
        row(
            "content-length 0, then DATA (POST)",
            data_after_zero("POST"),
            empty_end("POST"),
        ),
    ];
    // The edge's limits (clients.max_headers 100, max_header_bytes 32 KiB,
    // max_request_line 8 KiB), as for HTTP/1.1.
    for (why, bad, good, status) in [
        ("101 fields, over max_headers", many(101), many(100), 431),
        ("1,500 fields", many(1500), many(100), 431),
        (
            "a 33 KiB field, over max_header_bytes",
            big(33 * 1024),
            big(16 * 1024),
            431,
        ),
        ("a 60 KB field", big(60_000), big(16 * 1024), 431),
        (
            ":path over max_request_line",
            long_path(9 * 1024),
            long_path(4 * 1024),
            414,
        ),
    ] {
        rows.push(Row {
            why,
            bad,
            good,
            status: Some(status),
        });
    }
    rows
}

trait TapPush {
    fn tap_push(self, field: (Vec<u8>, Vec<u8>)) -> Self;
}

impl TapPush for Req {
    fn tap_push(mut self, field: (Vec<u8>, Vec<u8>)) -> Req {
        self.fields.push(field);
        self
    }
}

/// `r` with `{P}` in its values replaced by `path`.
fn fill_req(r: &Req, path: &str) -> Req {
    Req {
        fields: r
            .fields
            .iter()
            .map(|(n, v)| (n.clone(), fill(v, path)))
            .collect(),
        body: r.body.clone(),
    }
}

/// Sends `r` on a new connection as stream 1 and returns how it ended.
async fn send(port: u16, r: &Req) -> Outcome {
    let mut conn = H2Conn::open(port).await;
    conn.headers(1, &r.fields, r.body.is_none()).await;
    if let Some(body) = &r.body {
        conn.data(1, body, true).await;
    }
    conn.outcome(1).await
}

fn h2_listener(port: u16) -> String {
    format!("[{{ address: \"127.0.0.1:{port}\", http2: true }}]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_h2_request_is_refused_and_its_twin_passes() {
    let (other, app) = (RawBackend::start().await, RawBackend::start().await);
    let gw = Gateway::start_listening(
        h2_listener,
        &format!(
            "upstreams:\n  other: {{ backends: [{}] }}\n  app: {{ backends: [{}] }}\n\
             routes:\n  - {{ match: {{ prefix: /, host: {HOST} }}, upstream: other }}\n\
             \x20 - {{ match: {{ prefix: / }}, upstream: app }}\n",
            other.addr, app.addr
        ),
    );
    let rows = table();
    assert!(rows.len() >= 40, "{} rows", rows.len());
    let seen = || other.received().len() + app.received().len();
    for (i, r) in rows.iter().enumerate() {
        let before = seen();
        let outcome = send(gw.port, &fill_req(&r.bad, &format!("/bad/{i}"))).await;
        assert!(outcome.refused(), "row {i} ({}): {outcome:?}", r.why);
        if let Some(status) = r.status {
            assert_eq!(outcome, Outcome::Status(status), "row {i} ({})", r.why);
        }
        assert_eq!(seen(), before, "row {i} ({}) reached a backend", r.why);
    }
    for (i, r) in rows.iter().enumerate() {
        let outcome = send(gw.port, &fill_req(&r.good, &format!("/good/{i}"))).await;
        assert_eq!(outcome, Outcome::Status(200), "twin of row {i} ({})", r.why);
    }
    // Every twin arrived once, at the host route; no refused row reached anything.
    let received = other.received();
    for i in 0..rows.len() {
        let copies = other.count(&format!("/good/{i} ")) + other.count(&format!("/good/{i}/"));
        assert_eq!(copies, 1, "twin {i}:\n{received}");
    }
    assert!(
        !received.contains("/bad/"),
        "refused row forwarded:\n{received}"
    );
    assert_eq!(app.received(), "", "something reached the default route");
}

/// The request head that `backend` received with `marker` in it, lower-cased.
fn head_with(backend: &RawBackend, marker: &str) -> String {
    let all = backend.received();
    all.split("\r\n\r\n")
        .find(|h| h.contains(marker))
        .unwrap_or_else(|| panic!("no request with {marker}:\n{all}"))
        .to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_survives_path_normalisation() {
    let (other, app, shadow, spare, target) = (
        RawBackend::start().await,
        RawBackend::start().await,
        RawBackend::start().await,
        RawBackend::start().await,
        RawBackend::start().await,
    );
    let gw = Gateway::start_listening(
        h2_listener,
        &format!(
            "upstreams:\n  other: {{ backends: [{}] }}\n  app: {{ backends: [{}] }}\n  \
             shadow: {{ backends: [{}] }}\n  spare: {{ backends: [{}] }}\n  target: {{ backends: [{}] }}\n  \
             dead: {{ backends: [127.0.0.1:{}], retries: 0 }}\n\
             routes:\n  - {{ match: {{ prefix: /, host: {HOST} }}, upstream: other }}\n\
             \x20 - match: {{ prefix: /s/, host: {HOST} }}\n    upstream: other\n    strip_prefix: true\n    \
             mirror: [{{ upstream: shadow, percent: 100 }}]\n\
             \x20 - {{ match: {{ prefix: /fb/, host: {HOST} }}, upstream: dead, fallback: [spare] }}\n\
             \x20 - {{ match: {{ prefix: /ev/, host: {HOST} }}, broadcast: [target] }}\n\
             \x20 - {{ match: {{ prefix: / }}, upstream: app }}\n",
            other.addr,
            app.addr,
            shadow.addr,
            spare.addr,
            target.addr,
            free_port()
        ),
    );
    // (path sent, path the backend must get)
    let cases = [
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/%41", "/A"),
        ("//x", "/x"),
        ("/q/./r?x=1", "/q/r?x=1"),
    ];
    for (i, (sent, want)) in cases.iter().enumerate() {
        let mut fields = get(HOST, sent);
        fields.push(f(b"x-case", format!("case-{i}").as_bytes()));
        let outcome = send(gw.port, &req(fields)).await;
        assert_eq!(outcome, Outcome::Status(200), "{sent}");
        let head = head_with(&other, &format!("x-case: case-{i}"));
        let line = format!("get {} http/1.1\r\n", want.to_ascii_lowercase());
        assert!(head.starts_with(&line), "{sent}: {head}");
        assert!(
            head.contains(&format!("\r\nhost: {HOST}")),
            "{sent}: {head}"
        );
    }
    assert_eq!(
        app.received(),
        "",
        "the default route got a host-routed request"
    );
    // strip_prefix and the mirror's copy keep the host too.
    let mut fields = get(HOST, "/s/./t");
    fields.push(f(b"x-case", b"strip"));
    assert_eq!(send(gw.port, &req(fields)).await, Outcome::Status(200));
    let head = head_with(&other, "x-case: strip");
    assert!(head.starts_with("get /t http/1.1\r\n"), "{head}");
    assert!(head.contains(&format!("\r\nhost: {HOST}")), "{head}");
    eventually(Duration::from_secs(5), "the mirror's copy", || async {
        shadow.received().contains("x-case: strip")
    })
    .await;
    let copy = head_with(&shadow, "x-case: strip");
    assert!(copy.starts_with("get /s/t http/1.1\r\n"), "{copy}");
    assert!(copy.contains(&format!("\r\nhost: {HOST}")), "{copy}");
    // So do a fallback's copy (the primary is down: the fallback answers) and a
    // broadcast's delivery.
    let mut fields = get(HOST, "/fb/./u");
    fields.push(f(b"x-case", b"fallback"));
    assert_eq!(send(gw.port, &req(fields)).await, Outcome::Status(200));
    let copy = head_with(&spare, "x-case: fallback");
    assert!(copy.starts_with("get /fb/u http/1.1\r\n"), "{copy}");
    assert!(copy.contains(&format!("\r\nhost: {HOST}")), "{copy}");
    let mut fields = request("POST", HOST, "/ev/./v");
    fields.push(f(b"x-case", b"broadcast"));
    assert_eq!(send(gw.port, &req(fields)).await, Outcome::Status(202));
    eventually(
        Duration::from_secs(5),
        "the broadcast's delivery",
        || async { target.received().contains("x-case: broadcast") },
    )
    .await;
    let delivery = head_with(&target, "x-case: broadcast");
    assert!(
        delivery.starts_with("post /ev/v http/1.1\r\n"),
        "{delivery}"
    );
    assert!(
        delivery.contains(&format!("\r\nhost: {HOST}")),
        "{delivery}"
    );
    // The access log names the host and the normalised path.
    let line = stdout_line(&gw, "\"path\":\"/a/b\"").await;
    assert!(line.contains(&format!("\"host\":\"{HOST}\"")), "{line}");
}

/// `fanout_client_refused_total{reason}` on `gw`.
async fn refused(gw: &Gateway, reason: &str) -> u64 {
    let series = format!("fanout_client_refused_total{{reason=\"{reason}\"}}");
    metric(&client(), gw, &series).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_its_length_is_not_sent_again() {
    let backend = RawBackend::start().await;
    let gw = Gateway::start_listening(
        h2_listener,
        &format!(
            "upstreams:\n  u: {{ backends: [{}], retries: 2 }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
            backend.addr
        ),
    );
    // PUT is idempotent: a retry would be allowed if the failure were the upstream's.
    let mut conn = H2Conn::open(gw.port).await;
    let mut fields = request("PUT", HOST, "/put");
    fields.push(f(b"content-length", b"5"));
    conn.headers(1, &fields, false).await;
    conn.data(1, b"hel", false).await;
    eventually(Duration::from_secs(5), "the head upstream", || async {
        backend.count("PUT /put HTTP/1.1") == 1
    })
    .await;
    // Three more bytes: six in all against a declared five.
    conn.data(1, b"lo!", true).await;
    let outcome = conn.outcome(1).await;
    assert!(outcome.refused(), "{outcome:?}");
    // The access log line is written once the request is over, retries and all.
    stdout_line(&gw, "\"path\":\"/put\"").await;
    assert_eq!(
        backend.count("PUT /put HTTP/1.1"),
        1,
        "{}",
        backend.received()
    );
    assert_eq!(backend.connections(), 1, "a retry opened a connection");
    assert_eq!(refused(&gw, "bad_request").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_ends_the_request_without_a_retry() {
    // The backend never answers: each request is in flight when its client resets it.
    let backend = RawBackend::silent().await;
    let gw = Gateway::start_listening(
        h2_listener,
        &format!(
            "upstreams:\n  u: {{ backends: [{}], retries: 2 }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
            backend.addr
        ),
    );
    let mut conn = H2Conn::open(gw.port).await;
    const STREAMS: u32 = 50;
    for n in 0..STREAMS {
        let stream = 2 * n + 1;
        let path = format!("/r/{n}");
        conn.headers(stream, &get(HOST, &path), true).await;
        let line = format!("GET {path} HTTP/1.1");
        eventually(Duration::from_secs(5), "the request upstream", || async {
            backend.count(&line) == 1
        })
        .await;
        conn.cancel(stream).await;
        // The access log line is written once the request is over, retries and all.
        stdout_line(&gw, &format!("\"path\":\"{path}\"")).await;
        assert_eq!(backend.count(&line), 1, "stream {n} was sent again");
    }
    assert_eq!(refused(&gw, "client_closed").await, u64::from(STREAMS));
    assert_eq!(backend.connections(), STREAMS as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_last_data_frame_ends_the_body_once() {
    // Found by fuzz/fuzz_targets/h2_listener.rs: HEADERS without END_STREAM, then an empty
    // DATA frame with it (a body-less request some clients send this way) went upstream as
    // chunked with its terminator twice; the stray `0\r\n\r\n` stayed on the pooled
    // connection, in front of the next request.
    let (backend, shadow) = (RawBackend::start().await, RawBackend::start().await);
    let gw = Gateway::start_listening(
        h2_listener,
        &format!(
            "upstreams:\n  u: {{ backends: [{}] }}\n  shadow: {{ backends: [{}] }}\n\
             routes:\n  - match: {{ prefix: / }}\n    upstream: u\n    \
             mirror: [{{ upstream: shadow, percent: 100 }}]\n",
            backend.addr, shadow.addr
        ),
    );
    for n in 0..3 {
        let mut conn = H2Conn::open(gw.port).await;
        conn.headers(1, &request("POST", HOST, &format!("/e/{n}")), false)
            .await;
        conn.data(1, b"", true).await;
        assert_eq!(conn.outcome(1).await, Outcome::Status(200), "request {n}");
    }
    eventually(Duration::from_secs(5), "the mirror's copies", || async {
        shadow.count("POST /e/") == 3
    })
    .await;
    // Each connection's bytes are exactly three well-framed requests, by the edge's own
    // strict framer.
    for (name, b) in [("backend", &backend), ("mirror", &shadow)] {
        let all = b.received();
        let mut framer = Framer::new(Limits::default());
        assert_eq!(framer.feed(all.as_bytes()), Ok(0), "{name}:\n{all}");
        assert_eq!(
            (framer.heads(), framer.phase()),
            (3, Phase::Idle),
            "{name}:\n{all}"
        );
    }
    assert!(!backend.received().contains("0\r\n\r\n0\r\n\r\n"));
}
