//! Arbitrary HTTP/2 frame sequences sent to a running gateway (in this process, on an h2c
//! listener with a host route and a default route), and every request that reaches the
//! backend checked: it must be well-formed HTTP/1.1 by fanout's own strict framer (the
//! edge's grammar) and carry a non-empty `Host`. A violation aborts the process, which
//! libFuzzer reports as a crash.
//!
//! The input is read as a list of operations: HEADERS and CONTINUATION blocks built from a
//! dictionary of interesting fields (pseudo-headers, lengths, hosts, connection-specific
//! fields, dot segments) and raw bytes, HPACK-encoded; DATA; RST_STREAM; raw frames of any
//! type. They are written on a fresh connection after the preface, and the answers read
//! until the gateway closes or goes quiet.
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fanout::edge::framing::{Framer, Limits, Phase};
use libfuzzer_sys::fuzz_target;

const HOST: &[u8] = b"routed.example";

const DICT: &[(&[u8], &[u8])] = &[
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":method", b"PUT"),
    (b":method", b"HEAD"),
    (b":method", b"CONNECT"),
    (b":method", b"G T"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":authority", HOST),
    (b":authority", b"other.example"),
    (b":authority", b"u@routed.example"),
    (b":authority", b""),
    (b":path", b"/"),
    (b":path", b"/a/./b"),
    (b":path", b"/a/../b"),
    (b":path", b"//x"),
    (b":path", b"/%41"),
    (b":path", b"/..;/x"),
    (b":path", b"/%2e%2e;/x"),
    (b":path", b"*"),
    (b":path", b"http://routed.example/"),
    (b":path", b""),
    (b":protocol", b"websocket"),
    (b":status", b"200"),
    (b"host", HOST),
    (b"host", b""),
    (b"host", b"other.example"),
    (b"content-length", b"0"),
    (b"content-length", b"5"),
    (b"content-length", b"0, 0"),
    (b"content-length", b"-1"),
    (b"transfer-encoding", b"chunked"),
    (b"connection", b"close"),
    (b"te", b"trailers"),
    (b"te", b"gzip"),
    (b"upgrade", b"h2c"),
    (b"expect", b"100-continue"),
    (b"x-a", b" b"),
    (b"x-a", b"b\t"),
    (b"x\"a", b"b"),
    (b"X-Upper", b"a"),
    (b"cookie", b"a=b"),
];

/// Reads the input a byte (or a run) at a time; zeros once it is used up.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, max: usize) -> &[u8] {
        let n = (self.byte() as usize % (max + 1)).min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken
    }

    fn stream(&mut self) -> u32 {
        u32::from(self.byte() % 8) * 2 + 1
    }

    fn fields(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..self.byte() % 12)
            .map(|_| match self.byte() {
                k if k < 0xc0 => {
                    let (n, v) = DICT[k as usize % DICT.len()];
                    (n.to_vec(), v.to_vec())
                }
                _ => (self.bytes(24).to_vec(), self.bytes(40).to_vec()),
            })
            .collect()
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The bytes a client sends for `data`: the preface, SETTINGS, then the operations.
fn client_bytes(data: &[u8]) -> Vec<u8> {
    let mut input = Input(data);
    let mut encoder = loona_hpack::Encoder::new();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let mut ops = 0;
    while !input.0.is_empty() && ops < 64 {
        ops += 1;
        match input.byte() % 6 {
            // HEADERS, usually a whole well-ordered request, END_HEADERS unless the flag
            // byte says otherwise.
            0 | 1 => {
                let stream = input.stream();
                let flags = input.byte();
                let mut fields = input.fields();
                if flags & 0x80 == 0 {
                    let mut base: Vec<(Vec<u8>, Vec<u8>)> = [
                        (&b":method"[..], &b"GET"[..]),
                        (b":scheme", b"http"),
                        (b":authority", HOST),
                        (b":path", b"/a/./b"),
                    ]
                    .iter()
                    .map(|(n, v)| (n.to_vec(), v.to_vec()))
                    .collect();
                    base.append(&mut fields);
                    fields = base;
                }
                let block = encoder.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
                let flags = (flags & 0x1) | if flags & 0x40 == 0 { 0x4 } else { 0 };
                frame(&mut out, 0x1, flags, stream, &block);
            }
            2 => {
                let stream = input.stream();
                let fields = input.fields();
                let block = encoder.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
                let flags = input.byte() & 0x4;
                frame(&mut out, 0x9, flags, stream, &block);
            }
            3 => {
                let stream = input.stream();
                let flags = input.byte() & 0x1;
                let body = input.bytes(64).to_vec();
                frame(&mut out, 0x0, flags, stream, &body);
            }
            4 => {
                let stream = input.stream();
                let code = u32::from(input.byte() % 14);
                frame(&mut out, 0x3, 0, stream, &code.to_be_bytes());
            }
            _ => {
                let kind = input.byte() % 10;
                let flags = input.byte();
                let stream = u32::from(input.byte() % 8);
                let payload = input.bytes(32).to_vec();
                frame(&mut out, kind, flags, stream, &payload);
            }
        }
    }
    out
}

/// Bytes the backend has read, in all: an input is over once this stops moving.
static BACKEND_READ: AtomicU64 = AtomicU64::new(0);

/// Checks what the gateway sends one backend connection, answering each request.
fn backend_connection(mut conn: TcpStream) {
    let limits = Limits {
        max_request_line: 1 << 20,
        max_header_bytes: 1 << 20,
        max_headers: 10_000,
    };
    let mut framer = Framer::new(limits);
    let mut head = Vec::new();
    // Everything this connection received, for the report.
    let mut all = Vec::new();
    let mut answered = 0;
    let mut buf = [0u8; 16384];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        all.extend_from_slice(&buf[..n]);
        BACKEND_READ.fetch_add(n as u64, SeqCst);
        for &b in &buf[..n] {
            let before = framer.phase();
            if let Err(e) = framer.feed(&[b]) {
                eprintln!(
                    "malformed request upstream ({e:?}); the connection received:\n{:?}",
                    String::from_utf8_lossy(&all)
                );
                std::process::abort();
            }
            let after = framer.phase();
            if before == Phase::Head || after == Phase::Head {
                head.push(b);
            }
            if before == Phase::Head && after != Phase::Head {
                check_host(&head);
                head.clear();
            }
        }
        if framer.phase() == Phase::Idle {
            while answered < framer.heads() {
                answered += 1;
                let ok = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                if ok.is_err() {
                    return;
                }
            }
        }
    }
}

/// A complete request head upstream must name a non-empty host.
fn check_host(head: &[u8]) {
    let mut fields = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut fields);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        // More fields than this check holds: the framer has judged it already.
        return;
    }
    let host = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host"));
    if host.map_or(true, |h| h.value.iter().all(|b| *b == b' ' || *b == b'\t')) {
        eprintln!("request upstream without a host: {:?}", String::from_utf8_lossy(head));
        std::process::abort();
    }
}

/// The gateway's listener, started once: a raw backend, then fanout in this process.
fn gateway() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let backend = TcpListener::bind("127.0.0.1:0").expect("backend");
        let backend_addr = backend.local_addr().expect("backend address");
        std::thread::spawn(move || {
            for conn in backend.incoming().flatten() {
                std::thread::spawn(move || backend_connection(conn));
            }
        });
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = std::env::temp_dir().join(format!("fanout-fuzz-h2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let yaml = format!(
            "server: {{ threads: 1, pid_file: {d}/fanout.pid, upgrade_sock: {d}/upgrade.sock }}\n\
             listen: [{{ address: \"127.0.0.1:{port}\", http2: true }}]\n\
             clients: {{ body_timeout: 200ms }}\n\
             defaults: {{ access_log: off }}\n\
             upstreams:\n  other: {{ backends: [\"{backend_addr}\"] }}\n  app: {{ backends: [\"{backend_addr}\"] }}\n\
             routes:\n  - {{ match: {{ prefix: /, host: routed.example }}, upstream: other, strip_prefix: false }}\n\
             \x20 - {{ match: {{ prefix: / }}, upstream: app }}\n",
            d = dir.display()
        );
        let config = fanout::config::from_yaml(&yaml, "fuzz").expect("fuzz configuration");
        let process = fanout::app::server::ProcessOptions {
            daemon: false,
            upgrade: false,
        };
        let source = fanout::app::server::Source {
            text: yaml.clone(),
            file: None,
        };
        let (server, _gateway) =
            fanout::app::server::build(config, source, process, Vec::new(), None).expect("fanout server");
        std::thread::spawn(move || server.run_forever());
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "fanout did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        addr
    })
}

fuzz_target!(|data: &[u8]| {
    let addr = gateway();
    let Ok(mut conn) = TcpStream::connect(addr) else {
        return;
    };
    let _ = conn.write_all(&client_bytes(data));
    // Read the answers until the gateway closes the connection or is quiet for 30 ms.
    let _ = conn.set_read_timeout(Some(Duration::from_millis(30)));
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut buf = [0u8; 16384];
    while Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    drop(conn);
    // What this input made the gateway send upstream is checked before the next input:
    // wait until the backend has read nothing new for 20 ms (at most 300 ms).
    let deadline = Instant::now() + Duration::from_millis(300);
    let mut seen = BACKEND_READ.load(SeqCst);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = BACKEND_READ.load(SeqCst);
        if now == seen {
            break;
        }
        seen = now;
    }
});
