//! WebSocket (and any `Upgrade`) through the gateway: the handshake reaches the backend with
//! its `Upgrade` and `Connection` headers, the `101` turns the connection into a tunnel,
//! frames pass both ways (a 1 MiB message too), the close handshake completes, 100 sockets
//! work at once, over plain and TLS listeners, and nothing is mirrored. Two thousand
//! handshakes against a backend that answers at once all get their tunnel; a quiet tunnel
//! ends after `timeouts.tunnel`; a declined upgrade is relayed; no backend gives 502.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::pki::Ca;
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// An echo WebSocket server; records the handshake headers it received. It answers at
/// once: a backend on the same host answers a handshake within microseconds, which is
/// when a proxy that lets the `101` overtake the request's end loses the tunnel.
async fn echo_server() -> (SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
    echo_server_on(None).await
}

/// [`echo_server`], speaking TLS with `tls` when given.
async fn echo_server_on(
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
    let record = Arc::clone(&seen);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => echo(stream, record).await,
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            echo(tls, record).await
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Serves one WebSocket connection: every text or binary message is sent back.
async fn echo<S>(stream: S, record: Arc<Mutex<Vec<http::HeaderMap>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    #[allow(clippy::result_large_err)] // tungstenite's callback type
    let callback = |req: &Request, resp: Response| {
        record.lock().unwrap().push(req.headers().clone());
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_close() {
            return; // tungstenite answers the close
        }
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

/// One socket's life: a text and a binary message echoed, then the close handshake.
async fn talk<S>(mut ws: tokio_tungstenite::WebSocketStream<S>, binary_len: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text("hello")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo in time")
        .expect("a message")
        .expect("no error");
    assert_eq!(echo, Message::text("hello"));
    let payload: Vec<u8> = (0..binary_len).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(payload.clone())).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("binary echo in time")
        .expect("a message")
        .expect("no error");
    let data: Vec<u8> = echo.into_data();
    assert_eq!(data, payload);
    ws.close(None).await.unwrap();
    // The server's close frame comes back, then the stream ends.
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        let mut frames = Vec::new();
        while let Some(Ok(m)) = ws.next().await {
            frames.push(m);
        }
        frames
    })
    .await
    .expect("close handshake in time");
    assert!(
        rest.iter().all(|m| matches!(m, Message::Close(_))),
        "{rest:?}"
    );
}

fn routes(ws: SocketAddr, shadow: SocketAddr) -> String {
    format!(
        "upstreams:\n  ws: {{ backends: [{ws}] }}\n  shadow: {{ backends: [{shadow}] }}\n\
         routes:\n  - {{ name: ws, match: {{ prefix: /ws }}, upstream: ws, mirror: [{{ upstream: shadow }}] }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_pass_through_a_plain_listener() {
    let (ws_addr, seen) = echo_server().await;
    let shadow = Backend::start("shadow").await;
    let gw = Gateway::start(&routes(ws_addr, shadow.addr));

    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gw.port))
        .await
        .expect("handshake through the gateway");
    assert_eq!(resp.status(), 101);
    talk(ws, 1024 * 1024).await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen[0]["upgrade"].to_str().unwrap().to_lowercase(),
            "websocket"
        );
        assert!(seen[0]["connection"]
            .to_str()
            .unwrap()
            .to_lowercase()
            .contains("upgrade"));
        assert!(seen[0].contains_key("sec-websocket-key"));
    }

    // 100 sockets at once.
    let mut all = Vec::new();
    for _ in 0..100 {
        let url = format!("ws://127.0.0.1:{}/ws", gw.port);
        all.push(tokio::spawn(async move {
            let (ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("handshake");
            talk(ws, 4096).await;
        }));
    }
    for t in all {
        t.await.expect("socket task");
    }
    assert_eq!(seen.lock().unwrap().len(), 101);

    // A plain request on the same route still works and is mirrored; upgrades were not.
    let c = client();
    let _ = c.get(gw.url("/ws/plain")).send().await; // the echo server refuses it
    eventually(Duration::from_secs(5), "the plain request's copy", || {
        let shadow = &shadow;
        async move { shadow.hits() == 1 }
    })
    .await;
    assert_eq!(
        metric(
            &c,
            &gw,
            "fanout_requests_total{route=\"ws\",status=\"101\"}"
        )
        .await,
        101
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_through_a_tls_listener() {
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "ws");
    let cert = ca.issue(&dir, "ws", &["ws.test"]);
    let (ws_addr, _) = echo_server().await;
    let shadow = Backend::start("shadow").await;
    let gw = Gateway::start_listening(
        |port| {
            format!(
                "[{{ address: \"127.0.0.1:{port}\", tls: {{ certificates: [{{ cert: {}, key: {} }}] }} }}]",
                cert.cert.display(),
                cert.key.display()
            )
        },
        &routes(ws_addr, shadow.addr),
    );
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[b"http/1.1"]));
    let tcp = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("ws.test").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let (ws, resp) = tokio_tungstenite::client_async("wss://ws.test/ws", tls)
        .await
        .expect("WebSocket handshake over TLS");
    assert_eq!(resp.status(), 101);
    let talked = tokio::spawn(talk(ws, 1024 * 1024)).await;
    assert!(talked.is_ok(), "gateway said:\n{}", gw.stderr());
}

/// Handshake, one echoed message, close; for many sockets in a row.
async fn echo_once(url: String) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("handshake");
    ws.send(Message::text("ping")).await.expect("send");
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo in time");
    assert!(
        matches!(echo, Some(Ok(Message::Text(ref t))) if t.as_str() == "ping"),
        "tunnel lost: {echo:?}"
    );
    let _ = ws.close(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_handshake_gets_its_tunnel_from_a_backend_that_answers_at_once() {
    let (ws_addr, seen) = echo_server().await;
    let shadow = Backend::start("shadow").await;
    let gw = Gateway::start(&routes(ws_addr, shadow.addr));
    // 8 clients at a time, 250 handshakes each; every one must carry a message.
    let mut clients = Vec::new();
    for _ in 0..8 {
        let url = format!("ws://127.0.0.1:{}/ws", gw.port);
        clients.push(tokio::spawn(async move {
            for _ in 0..250 {
                echo_once(url.clone()).await;
            }
        }));
    }
    for c in clients {
        c.await.expect("every tunnel carried its message");
    }
    assert_eq!(seen.lock().unwrap().len(), 2000);
    let c = client();
    eventually(Duration::from_secs(5), "tunnels counted closed", || {
        let (c, gw) = (&c, &gw);
        async move { metric(c, gw, "fanout_tunnels_open{upstream=\"ws\"}").await == 0 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_tunnel_ends_after_timeouts_tunnel_and_is_counted_while_open() {
    let (ws_addr, _) = echo_server().await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  ws: {{ backends: [{ws_addr}], timeouts: {{ tunnel: 400ms }} }}\n\
         routes:\n  - {{ name: ws, match: {{ prefix: /ws }}, upstream: ws }}\n"
    ));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gw.port))
        .await
        .expect("handshake");
    let c = client();
    assert_eq!(
        metric(&c, &gw, "fanout_tunnels_open{upstream=\"ws\"}").await,
        1
    );
    // Traffic keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ws.send(Message::text("still here")).await.expect("send");
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        assert!(matches!(echo, Ok(Some(Ok(Message::Text(_))))), "{echo:?}");
    }
    // ...silence ends it.
    let started = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the gateway closes a quiet tunnel");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    eventually(Duration::from_secs(5), "the tunnel counted closed", || {
        let (c, gw) = (&c, &gw);
        async move { metric(c, gw, "fanout_tunnels_open{upstream=\"ws\"}").await == 0 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_upgrade_is_relayed_and_a_dead_backend_gives_502() {
    // A plain HTTP backend declines the upgrade with its own answer.
    let plain = Backend::start("plain").await;
    let dead = silent_listener_closed();
    let gw = Gateway::start(&format!(
        "upstreams:\n  plain: {{ backends: [{}] }}\n  dead: {{ backends: [{dead}], retries: 0 }}\n\
         routes:\n  - {{ match: {{ prefix: /plain }}, upstream: plain }}\n\
         \x20 - {{ match: {{ prefix: /dead }}, upstream: dead }}\n",
        plain.addr
    ));
    let head = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };
    let declined = client()
        .get(gw.url("/plain/x"))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .send()
        .await
        .expect("an answer");
    assert_eq!(declined.status(), 200);
    let seen = plain.seen().pop().expect("the backend saw the handshake");
    assert_eq!(seen.headers["upgrade"], "websocket");

    let (answer, closed) = raw(gw.port, head("/dead/x").as_bytes());
    assert!(closed && answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("request_id"), "{answer}");
}

/// An address where nothing listens (connections are refused).
fn silent_listener_closed() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_reach_a_tls_backend_over_http11_even_where_h2_is_offered() {
    let dir = scratch_dir();
    let ca = Ca::new(&dir, "wss");
    let cert = ca.issue(&dir, "backend", &["backend.test"]);
    // The backend offers h2 and http/1.1 by ALPN; an upgrade needs HTTP/1.1.
    let (ws_addr, seen) = echo_server_on(Some(crate::common::pki::server_config(&cert))).await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  ws: {{ backends: [{ws_addr}], protocol: auto, \
         tls: {{ ca_file: {}, sni: backend.test }} }}\n\
         routes:\n  - {{ name: ws, match: {{ prefix: /ws }}, upstream: ws }}\n",
        ca.pem_path.display()
    ));
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gw.port))
        .await
        .expect("handshake through the gateway to a TLS backend");
    assert_eq!(resp.status(), 101);
    talk(ws, 64 * 1024).await;
    assert_eq!(seen.lock().unwrap().len(), 1);
}
