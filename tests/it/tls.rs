//! TLS and HTTP/2: termination with SNI, h2 by ALPN and h1.1 on the same listener, h2c with
//! prior knowledge, TLS to backends (verified, refused, unverified), copies to TLS
//! backends, and `-t` on certificate files. A private CA is made for each test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::pki::{self, Ca};
use crate::common::*;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// A reqwest client that trusts `ca` and finds every `names` on 127.0.0.1:`port`.
fn tls_client(ca: &Ca, names: &[&str], port: u16) -> reqwest::ClientBuilder {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.reqwest_root())
        .timeout(Duration::from_secs(10));
    for n in names {
        b = b.resolve(n, SocketAddr::from(([127, 0, 0, 1], port)));
    }
    b
}

/// The leaf certificate the listener serves for `name`, and the protocol ALPN chose.
async fn handshake(ca: &Ca, port: u16, name: &str, alpn: &[&[u8]]) -> (Vec<u8>, Option<Vec<u8>>) {
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(alpn));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let server = ServerName::try_from(name.to_string()).unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(server, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let session = tls.get_ref().1;
    let leaf = session.peer_certificates().unwrap()[0].to_vec();
    (leaf, session.alpn_protocol().map(|p| p.to_vec()))
}

fn tls_listener(port: u16, certs: &[&pki::Issued], extra: &str) -> String {
    let list: Vec<String> = certs
        .iter()
        .map(|c| format!("{{ cert: {}, key: {} }}", c.cert.display(), c.key.display()))
        .collect();
    format!(
        "[{{ address: \"127.0.0.1:{port}\", tls: {{ certificates: [{}] {extra} }} }}]",
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_h2_and_http11_share_the_listener() {
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "edge");
    let a = ca.issue(&dir, "a", &["a.test"]);
    let b = ca.issue(&dir, "b", &["b.test", "*.wild.test"]);
    let backend = Backend::start("app").await;
    let gw = Gateway::start_listening(
        |port| tls_listener(port, &[&a, &b], ""),
        &format!(
            "upstreams:\n  app: {{ backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: app }}\n",
            backend.addr
        ),
    );

    // SNI: each name gets its own certificate, a wildcard matches one level, and a name
    // that none has gets the first.
    assert_eq!(handshake(&ca, gw.port, "a.test", &[]).await.0, a.der);
    assert_eq!(handshake(&ca, gw.port, "b.test", &[]).await.0, b.der);
    assert_eq!(handshake(&ca, gw.port, "x.wild.test", &[]).await.0, b.der);
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[]));
    let tcp = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    // The default certificate names a.test only: a client asking for c.test refuses it.
    let refused = connector
        .connect(ServerName::try_from("c.test").unwrap(), tcp)
        .await;
    assert!(
        refused.is_err(),
        "c.test must not verify against a.test's certificate"
    );

    // ALPN: h2 when offered, HTTP/1.1 otherwise, on the same listener.
    assert_eq!(
        handshake(&ca, gw.port, "a.test", &[b"h2", b"http/1.1"])
            .await
            .1
            .as_deref(),
        Some(&b"h2"[..])
    );
    let h2 = tls_client(&ca, &["a.test"], gw.port).build().unwrap();
    let r = h2
        .get(format!("https://a.test:{}/x", gw.port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "app");
    let h1 = tls_client(&ca, &["b.test"], gw.port)
        .http1_only()
        .build()
        .unwrap();
    let r = h1
        .post(format!("https://b.test:{}/y", gw.port))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_11);
    assert_eq!(r.status(), 200);

    for (path, protocol) in [("/x", "HTTP/2+tls"), ("/y", "HTTP/1.1+tls")] {
        let line = stdout_line(&gw, &format!("\"path\":\"{path}\"")).await;
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["protocol"], protocol, "{line}");
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body.as_ref(), b"payload");
    for s in &seen {
        assert_eq!(s.headers["x-forwarded-proto"], "https");
    }
    // A client that is not speaking TLS at all is closed and counted.
    let (answer, _) = raw(gw.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    let c = client();
    eventually(
        Duration::from_secs(5),
        "tls_handshake refusal counted",
        || {
            let (c, gw) = (c.clone(), &gw);
            async move {
                metric(
                    &c,
                    gw,
                    "fanout_client_refused_total{reason=\"tls_handshake\"}",
                )
                .await
                    >= 1
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_13_refuses_tls12_clients() {
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "v");
    let a = ca.issue(&dir, "a", &["a.test"]);
    let backend = Backend::start("app").await;
    let gw = Gateway::start_listening(
        |port| tls_listener(port, &[&a], ", min_version: \"1.3\""),
        &format!(
            "upstreams:\n  app: {{ backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: app }}\n",
            backend.addr
        ),
    );
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&ca.pem_path).unwrap(),
    )) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls12 = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls12));
    let tcp = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let r = connector
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await;
    assert!(r.is_err(), "a TLS 1.2 client must be refused");
    // TLS 1.3 passes.
    handshake(&ca, gw.port, "a.test", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_beside_http11_on_a_plain_listener() {
    let backend = Backend::start("app").await;
    let gw = Gateway::start_listening(
        |port| format!("[{{ address: \"127.0.0.1:{port}\", http2: true }}]"),
        &format!(
            "upstreams:\n  app: {{ backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: app }}\n",
            backend.addr
        ),
    );
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = h2
        .post(gw.url("/h2"))
        .body(vec![7u8; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "app");
    let (status, body, _) = get(&client(), &gw.url("/h1")).await;
    assert_eq!((status, body.as_str()), (200, "app"));
    // Framing checks still hold for HTTP/1 on that listener.
    let (answer, _) = raw(gw.port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body.len(), 100_000);
    assert_eq!(seen[0].headers["x-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_backends_are_verified_and_get_every_kind_of_copy() {
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "internal");
    let other = Ca::new(&dir, "other");
    let leaf = ca.issue(&dir, "backend", &["backend.test", "127.0.0.1"]);
    let main = Backend::start_tls("main", pki::server_config(&leaf)).await;
    let shadow = Backend::start_tls("shadow", pki::server_config(&leaf)).await;
    let spare = Backend::start_tls("spare", pki::server_config(&leaf)).await;
    let events = Backend::start_tls("events", pki::server_config(&leaf)).await;
    let tls = |ca: &Ca| {
        format!(
            "{{ ca_file: {}, sni: backend.test }}",
            ca.pem_path.display()
        )
    };
    let gw = Gateway::start(&format!(
        "upstreams:\n\
         \x20 main: {{ backends: [{m}], tls: {good} }}\n\
         \x20 h2: {{ backends: [{m}], tls: {good}, protocol: h2 }}\n\
         \x20 by_ip: {{ backends: [{m}], tls: {{ ca_file: {ca} }} }}\n\
         \x20 wrong_ca: {{ backends: [{m}], tls: {bad} }}\n\
         \x20 unverified: {{ backends: [{m}], tls: {{ verify: false }} }}\n\
         \x20 shadow: {{ backends: [{s}], tls: {good} }}\n\
         \x20 spare: {{ backends: [{p}], tls: {good} }}\n\
         \x20 events: {{ backends: [{e}], tls: {good} }}\n\
         routes:\n\
         \x20 - {{ match: {{ prefix: /main }}, upstream: main, mirror: [{{ upstream: shadow }}] }}\n\
         \x20 - {{ match: {{ prefix: /fb }}, upstream: wrong_ca, fallback: [spare] }}\n\
         \x20 - {{ match: {{ prefix: /h2 }}, upstream: h2 }}\n\
         \x20 - {{ match: {{ prefix: /ip }}, upstream: by_ip }}\n\
         \x20 - {{ match: {{ prefix: /wrong }}, upstream: wrong_ca }}\n\
         \x20 - {{ match: {{ prefix: /unverified }}, upstream: unverified }}\n\
         \x20 - {{ match: {{ prefix: /events }}, broadcast: [events] }}\n",
        m = main.addr,
        s = shadow.addr,
        p = spare.addr,
        e = events.addr,
        good = tls(&ca),
        bad = tls(&other),
        ca = ca.pem_path.display(),
    ));
    let c = client();
    let post = |path: &str, body: &'static str| {
        let r = c.post(gw.url(path)).body(body).send();
        async move {
            let r = r.await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(post("/main", "mirrored body").await, (200, "main".into()));
    for path in ["/h2", "/ip", "/unverified"] {
        let (status, body, _) = get(&c, &gw.url(path)).await;
        assert_eq!((status, body.as_str()), (200, "main"), "{path}");
    }
    let versions: Vec<http::Version> = main.seen().iter().map(|s| s.version).collect();
    assert_eq!(
        versions,
        [
            http::Version::HTTP_11,
            http::Version::HTTP_2,
            http::Version::HTTP_11,
            http::Version::HTTP_11
        ],
        "protocol: h2 speaks h2 to the backend, the others HTTP/1.1"
    );
    let (status, _, _) = get(&c, &gw.url("/wrong")).await;
    assert_eq!(status, 502, "a certificate from another CA must not verify");
    // The primary fails its TLS verification: the fallback's answer, from a TLS backend.
    assert_eq!(post("/fb", "fallback body").await, (200, "spare".into()));
    assert_eq!(post("/events", "event body").await.0, 202);

    let report = || {
        format!(
            "shadow {:?} spare {:?} events {:?}",
            shadow
                .seen()
                .iter()
                .map(|s| s.body.clone())
                .collect::<Vec<_>>(),
            spare
                .seen()
                .iter()
                .map(|s| s.body.clone())
                .collect::<Vec<_>>(),
            events
                .seen()
                .iter()
                .map(|s| s.body.clone())
                .collect::<Vec<_>>()
        )
    };
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let body = |b: &Backend| b.seen().first().map(|s| s.body.clone());
            if body(&shadow).as_deref() == Some(&b"mirrored body"[..])
                && body(&spare).as_deref() == Some(&b"fallback body"[..])
                && body(&events).as_deref() == Some(&b"event body"[..])
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "copies to the TLS backends: {}", report());
    let stderr = gw.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("TLS to backend"))
        .unwrap_or_else(|| panic!("no TLS error line in\n{stderr}"));
    assert!(
        line.contains(&main.addr.to_string())
            && line.contains("wrong_ca")
            && line.contains("UnknownIssuer"),
        "{line}"
    );
}

#[test]
fn check_names_missing_mismatched_and_expired_certificate_files() {
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "t");
    let a = ca.issue(&dir, "a", &["a.test"]);
    let b = ca.issue(&dir, "b", &["b.test"]);
    let old = ca.issue_expired(&dir, "old", &["old.test"]);
    let routes = "upstreams:\n  u: { backends: [127.0.0.1:9] }\nroutes:\n  - { match: { prefix: / }, upstream: u }\n";
    let conf = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "listen:\n  - address: 127.0.0.1:8443\n    tls:\n      certificates:\n        - {{ cert: {}, key: {} }}\n{routes}",
            cert.display(),
            key.display()
        )
    };
    let (ok, text) = check_yaml(&conf(&a.cert, &a.key));
    assert!(ok, "{text}");
    let (ok, text) = check_yaml(&conf(&a.cert, &b.key));
    assert!(!ok);
    assert!(
        text.contains("listen[0].tls.certificates[0]") && text.contains("does not match"),
        "{text}"
    );
    let (ok, text) = check_yaml(&conf(&a.cert, &dir.join("missing.key")));
    assert!(!ok);
    assert!(
        text.contains("cannot read") && text.contains("missing.key"),
        "{text}"
    );
    let (ok, text) = check_yaml(&conf(&old.cert, &old.key));
    assert!(!ok);
    assert!(text.contains("not valid now"), "{text}");
    let upstream = format!(
        "listen: 127.0.0.1:8080\nupstreams:\n  u: {{ backends: [127.0.0.1:9], tls: {{ ca_file: {} }} }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        dir.join("no-ca.pem").display()
    );
    let (ok, text) = check_yaml(&upstream);
    assert!(!ok);
    assert!(
        text.contains("upstreams.u.tls.ca_file") && text.contains("cannot read"),
        "{text}"
    );
    let mixed = "listen: 127.0.0.1:8080\nupstreams:\n  u: { backends: [\"https://127.0.0.1:9\", 127.0.0.1:10] }\n\
                 routes:\n  - { match: { prefix: / }, upstream: u }\n";
    let (ok, text) = check_yaml(mixed);
    assert!(!ok);
    assert!(text.contains("mixed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_kind_works_over_h2() {
    let (main, shadow, spare, events) = (
        Backend::start("main").await,
        Backend::start("shadow").await,
        Backend::start("spare").await,
        Backend::start("events").await,
    );
    main.set_status(503);
    let gw = Gateway::start_listening(
        |port| format!("[{{ address: \"127.0.0.1:{port}\", http2: true }}]"),
        &format!(
            "upstreams:\n  main: {{ backends: [{}] }}\n  shadow: {{ backends: [{}] }}\n  spare: {{ backends: [{}] }}\n  events: {{ backends: [{}] }}\n\
             routes:\n\
             \x20 - {{ match: {{ prefix: /fb }}, upstream: main, fallback: [spare], mirror: [{{ upstream: shadow }}], max_body_bytes: 1000 }}\n\
             \x20 - {{ match: {{ prefix: /events }}, broadcast: [events] }}\n\
             \x20 - {{ match: {{ prefix: /limited }}, upstream: spare, rate_limit: {{ requests_per_second: 1, burst: 1 }} }}\n",
            main.addr, shadow.addr, spare.addr, events.addr
        ),
    );
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let post = |path: &str, body: Vec<u8>| {
        let r = h2.post(gw.url(path)).body(body).send();
        async move {
            let r = r.await.unwrap();
            assert_eq!(r.version(), http::Version::HTTP_2);
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    // Fallback (the primary answers 503), with a mirror copy.
    assert_eq!(
        post("/fb", b"over h2".to_vec()).await,
        (200, "spare".into())
    );
    // 413 over the route's limit.
    assert_eq!(post("/fb", vec![1u8; 5000]).await.0, 413);
    // Broadcast: 202 at once.
    assert_eq!(post("/events", b"event".to_vec()).await.0, 202);
    // Rate limit: the second request within the second is refused.
    assert_eq!(post("/limited", Vec::new()).await.0, 200);
    assert_eq!(post("/limited", Vec::new()).await.0, 429);
    eventually(
        Duration::from_secs(10),
        "the mirror copy and the delivery",
        || {
            let (shadow, events) = (&shadow, &events);
            async move {
                shadow
                    .seen()
                    .first()
                    .is_some_and(|s| s.body.as_ref() == b"over h2")
                    && events
                        .seen()
                        .first()
                        .is_some_and(|s| s.body.as_ref() == b"event")
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_speaks_tls_to_https_backends() {
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "quick");
    let leaf = ca.issue(&dir, "backend", &["127.0.0.1"]);
    let backend = Backend::start_tls("tls", pki::server_config(&leaf)).await;
    let gw = Gateway::spawn_with(|port, admin| {
        vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--backends".into(),
            format!("https://{}", backend.addr),
            "--admin".into(),
            format!("127.0.0.1:{admin}"),
        ]
    });
    // `https://` verifies against the system's roots, which do not hold this test's CA:
    // the handshake happens, and fails verification, by name of the backend.
    let (status, _, _) = get(&client(), &gw.url("/")).await;
    assert_eq!(status, 502);
    let stderr = gw.stderr();
    assert!(
        stderr.lines().any(|l| l.contains("TLS to backend")
            && l.contains(&backend.addr.to_string())
            && l.contains("UnknownIssuer")),
        "{stderr}"
    );
}

/// h2 clients are held to the edge's deadlines: a TLS connection that chose h2 and then
/// says nothing is closed after `header_timeout`, one that sends something other than the
/// h2 preface at once, and an h2 connection without a stream after `keepalive_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connections_are_held_to_the_edge_deadlines() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "deadlines");
    let cert = ca.issue(&dir, "app", &["app.test"]);
    let backend = Backend::start("app").await;
    let gw = Gateway::start_listening(
        |port| tls_listener(port, &[&cert], ""),
        &format!(
            "clients: {{ header_timeout: 500ms, keepalive_timeout: 800ms }}\n\
             upstreams:\n  app: {{ backends: [{}] }}\n\
             routes:\n  - {{ match: {{ prefix: / }}, upstream: app }}\n",
            backend.addr
        ),
    );
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[b"h2"]));
    let connect = || async {
        let tcp = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
        let name = ServerName::try_from("app.test").unwrap();
        connector.connect(name, tcp).await.expect("TLS handshake")
    };
    // Silent after the handshake: closed after header_timeout.
    let mut silent = connect().await;
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("a silent h2 connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    let c = client();
    assert!(
        metric(
            &c,
            &gw,
            "fanout_client_refused_total{reason=\"header_timeout\"}"
        )
        .await
            >= 1
    );

    // Not the preface: closed at once.
    let mut wrong = connect().await;
    wrong
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(2), wrong.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // A request, then no stream: closed after keepalive_timeout, not before.
    let tls = connect().await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let req = http::Request::get("https://app.test/x")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.expect("an answer");
    assert_eq!(resp.status(), 200);
    drop(resp);
    let idle_from = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("an idle h2 connection is closed")
        .expect("connection task")
        .ok();
    let idled = idle_from.elapsed();
    assert!(idled >= Duration::from_millis(600), "{idled:?}");
}
