//! Backends found by DNS (`{ dns: NAME, port: P, interval: I }`), against a DNS server
//! written here (UDP on loopback, A records only, TTL 0) whose answers the test changes:
//! the upstream follows within an interval, added addresses pass their health checks before
//! they get traffic, removed ones drain (an answer in flight on one still arrives), and no
//! request fails while the answer changes. Backends listen on 127.0.0.2, 127.0.0.3, ...
//! with one port, as the records of one name do.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

/// A DNS server answering A queries from a table the test changes; any other name or
/// type gets NXDOMAIN (no records).
struct Dns {
    addr: SocketAddr,
    table: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Dns {
    fn start() -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind dns");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let table: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>> = Arc::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, q, s) = (Arc::clone(&table), Arc::clone(&queries), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(SeqCst) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                q.fetch_add(1, SeqCst);
                if let Some(answer) = answer(&buf[..n], &t.lock().unwrap()) {
                    let _ = socket.send_to(&answer, from);
                }
            }
        });
        Dns {
            addr,
            table,
            queries,
            stop,
        }
    }

    fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.table
            .lock()
            .unwrap()
            .insert(name.to_string(), ips.to_vec());
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// The reply to one query: its header and question echoed, then one A record per address
/// (TTL 0, the name as a pointer to the question's).
fn answer(query: &[u8], table: &HashMap<String, Vec<Ipv4Addr>>) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question_end = i + 4;
    let name = labels.join(".");
    let ips = match (qtype, table.get(&name)) {
        (1, Some(ips)) => ips.clone(),
        _ => Vec::new(),
    };
    let known = table.contains_key(&name);
    let mut out = Vec::with_capacity(question_end + 16 * ips.len());
    out.extend_from_slice(&query[0..2]); // id
                                         // QR, opcode 0, AA, RD copied; RA; NXDOMAIN for an unknown name.
    out.push(0x84 | (query[2] & 0x01));
    out.push(0x80 | if known { 0 } else { 3 });
    out.extend_from_slice(&[0, 1]); // one question
    out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional
    out.extend_from_slice(query.get(12..question_end)?);
    for ip in ips {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

/// Backends on 127.0.0.N:port for each N, one port for all.
async fn backends_on(ns: &[u8]) -> (u16, Vec<Backend>) {
    for _ in 0..20 {
        let port = free_port();
        let mut started = Vec::new();
        for &n in ns {
            match Backend::start_at(&format!("b{n}"), SocketAddr::from(([127, 0, 0, n], port)))
                .await
            {
                Some(b) => started.push(b),
                None => break,
            }
        }
        if started.len() == ns.len() {
            return (port, started);
        }
    }
    panic!("no port free on every address");
}

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_upstream_follows_dns_without_a_failed_request() {
    let dns = Dns::start();
    dns.set("api.test", &[ip(2)]);
    let (port, bs) = backends_on(&[2, 3]).await;
    let gw = Gateway::start(&format!(
        "resolver: {{ nameservers: [\"{}\"], timeout: 500ms }}\n\
         upstreams:\n  u:\n    balance: least_conn\n    \
         backends: [{{ dns: api.test, port: {port}, interval: 200ms }}]\n    \
         health_check: {{ type: http, path: /health, interval: 100ms, healthy_after: 2 }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        dns.addr
    ));
    let c = client();

    // Clients run throughout; every answer must be a 200.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (c, url, stop, failed, done) = (
            c.clone(),
            gw.url("/load"),
            Arc::clone(&stop),
            Arc::clone(&failed),
            Arc::clone(&done),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(SeqCst) {
                match c.get(&url).send().await.map(|r| r.status().as_u16()) {
                    Ok(200) => done.fetch_add(1, SeqCst),
                    _ => failed.fetch_add(1, SeqCst),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    eventually(Duration::from_secs(5), "b2 serves", || async {
        bs[0].hits() > 10
    })
    .await;
    assert_eq!(bs[1].hits(), 0, "127.0.0.3 is not in DNS yet");
    let status = status_json(&c, &gw).await;
    let backends = &status["upstreams"][0]["backends"];
    assert_eq!(backends.as_array().map(Vec::len), Some(1), "{status}");
    assert_eq!(backends[0]["source"], "dns:api.test", "{status}");

    // A second address: it joins, after its health checks, and takes requests.
    dns.set("api.test", &[ip(2), ip(3)]);
    let added = Instant::now();
    eventually(Duration::from_secs(5), "b3 takes requests", || async {
        bs[1].hits() > 10
    })
    .await;
    eprintln!(
        "the new address took requests {:?} after the DNS change",
        added.elapsed()
    );
    let checks_first = bs[1].state.checks_before_first_hit.load(SeqCst);
    assert!(
        checks_first >= 2,
        "b3 got traffic after {checks_first} health checks (healthy_after: 2)"
    );

    // A slow request on b2, then b2 leaves DNS: it drains (the slow answer arrives), and
    // gets nothing new.
    bs[0].set_delay(1500);
    let slow = {
        let (c, url) = (c.clone(), gw.url("/slow"));
        tokio::spawn(async move {
            // least_conn: the slow request may land on either; ask until b2 has one.
            c.get(&url).send().await.map(|r| r.status().as_u16())
        })
    };
    eventually(
        Duration::from_secs(5),
        "a request in flight on b2",
        || async { bs[0].state.inflight.load(SeqCst) > 0 },
    )
    .await;
    dns.set("api.test", &[ip(3)]);
    eventually(Duration::from_secs(5), "b2 leaves the upstream", || {
        let c = c.clone();
        let gw = &gw;
        async move {
            let status = status_json(&c, gw).await;
            status["upstreams"][0]["backends"].as_array().map(Vec::len) == Some(1)
        }
    })
    .await;
    let b2_hits = bs[0].hits();
    let metrics = metrics_text(&c, &gw).await;
    let gone = format!("fanout_backend_healthy{{backend=\"127.0.0.2:{port}\"");
    let stays = format!("fanout_backend_healthy{{backend=\"127.0.0.3:{port}\"");
    assert!(
        !metrics.contains(&gone) && metrics.contains(&stays),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    bs[0].set_delay(0);
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the request in flight on b2 finished"
    );
    assert!(
        bs[0].hits() <= b2_hits,
        "b2 got new requests after it left DNS"
    );

    stop.store(true, SeqCst);
    for t in load {
        t.await.unwrap();
    }
    eprintln!(
        "{} requests, {} failed; {} DNS queries",
        done.load(SeqCst),
        failed.load(SeqCst),
        dns.queries.load(SeqCst)
    );
    assert_eq!(failed.load(SeqCst), 0, "requests failed while DNS changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_stops_resolving_keeps_its_last_addresses() {
    let dns = Dns::start();
    dns.set("keep.test", &[ip(4)]);
    let (port, bs) = backends_on(&[4]).await;
    let gw = Gateway::start(&format!(
        "resolver: {{ nameservers: [\"{}\"] }}\n\
         upstreams:\n  u:\n    backends: [{{ dns: keep.test, port: {port}, interval: 100ms }}]\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        dns.addr
    ));
    let c = client();
    assert_eq!(get(&c, &gw.url("/a")).await.0, 200);
    // The name vanishes (NXDOMAIN): the last answer stands, logged, rather than an empty
    // upstream.
    dns.table.lock().unwrap().clear();
    let asked = dns.queries.load(SeqCst);
    eventually(
        Duration::from_secs(5),
        "the resolver asked again",
        || async { dns.queries.load(SeqCst) > asked + 2 },
    )
    .await;
    assert_eq!(get(&c, &gw.url("/b")).await.0, 200);
    assert_eq!(bs[0].hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_written_as_an_address_is_one_backend_tried_address_by_address() {
    // `web.test` resolves to two addresses; nothing listens on the first. Written as
    // `NAME:PORT` (not `dns:`), it is one backend, and no request fails for the dead one.
    let dns = Dns::start();
    dns.set("web.test", &[ip(2), ip(3)]);
    let (port, bs) = backends_on(&[3]).await;
    let gw = Gateway::start(&format!(
        "resolver: {{ nameservers: [\"{}\"], timeout: 500ms }}\n\
         upstreams:\n  u:\n    retries: 0\n    \
         backends: [\"web.test:{port}\"]\n    \
         health_check: {{ type: http, path: /health, interval: 100ms }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        dns.addr
    ));
    let c = client();
    let status = status_json(&c, &gw).await;
    let backends = &status["upstreams"][0]["backends"];
    assert_eq!(backends.as_array().map(Vec::len), Some(1), "{status}");
    assert_eq!(
        backends[0]["address"],
        format!("web.test:{port}"),
        "{status}"
    );
    for i in 0..300 {
        let (code, _, _) = get(&c, &gw.url(&format!("/n/{i}"))).await;
        assert_eq!(code, 200, "request {i}");
    }
    assert_eq!(bs[0].hits(), 300);
    // The health checks connect the same way: the backend stays healthy.
    let checks = bs[0].state.health_checks.load(SeqCst);
    eventually(Duration::from_secs(5), "health checks pass", || async {
        bs[0].state.health_checks.load(SeqCst) >= checks + 3
    })
    .await;
    let status = status_json(&c, &gw).await;
    assert_eq!(
        status["upstreams"][0]["backends"][0]["healthy"], true,
        "{status}"
    );
    let metrics = metrics_text(&c, &gw).await;
    assert!(
        metrics.contains(&format!(
            "fanout_upstream_requests_total{{backend=\"web.test:{port}\",outcome=\"ok\",upstream=\"u\"}} 300"
        )),
        "{metrics}"
    );
}
