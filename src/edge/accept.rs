//! Where client connections enter: [`Edge`] is the Pingora `ServerApp` of the proxy
//! service. It admits each connection against `clients.max_connections` and
//! `clients.max_connections_per_ip` (over a limit the connection is closed at once and
//! counted) — after reading its PROXY protocol header on a listener that takes one —, keeps `fanout_client_connections` per listener, wraps an HTTP/1 connection in
//! a [`ClientStream`], and hands it to Pingora's own HTTP server loop. [`Exchanges`] sits
//! inside that loop, between Pingora and the proxy, only to tell the stream when each
//! request's exchange is over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora_core::protocols::http::v2::server::H2Options;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Shutdown, Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use prometheus::IntGauge;

use super::admission::Connections;
use super::handshake::Terminator;
use super::proxy_protocol;
use super::stream::{self, ClientStream};
use super::ClientPolicy;

/// One listening address as the edge serves it.
pub struct EdgeListener {
    pub addr: SocketAddr,
    /// `fanout_client_connections` of this listener.
    pub gauge: IntGauge,
    pub tls: Option<Arc<Terminator>>,
    /// Plain listener with `http2: true`: h2c with prior knowledge beside HTTP/1.1.
    pub h2c: bool,
    /// A PROXY protocol header comes first ([`super::proxy_protocol`]).
    pub proxy_protocol: bool,
}

/// The proxy service's application: admission and defences, then Pingora's HTTP server.
pub struct Edge<A> {
    exchanges: Arc<Exchanges<A>>,
    /// The policy in force; each connection keeps the one it was admitted under.
    policy: Arc<ArcSwap<ClientPolicy>>,
    connections: Arc<Connections>,
    listeners: Vec<EdgeListener>,
}

impl<A> Edge<A> {
    pub fn new(
        app: A,
        policy: Arc<ArcSwap<ClientPolicy>>,
        connections: Arc<Connections>,
        listeners: Vec<EdgeListener>,
    ) -> Edge<A> {
        Edge {
            exchanges: Arc::new(Exchanges { app: Arc::new(app) }),
            policy,
            connections,
            listeners,
        }
    }

    /// The listener a connection came in on.
    fn listener(&self, local: Option<SocketAddr>) -> Option<&EdgeListener> {
        self.listeners
            .iter()
            .find(|l| local.is_some_and(|a| crate::config::listener_takes(&l.addr, &a)))
            .or(self.listeners.first())
    }
}

#[async_trait]
impl<A> ServerApp for Edge<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let listener = self.listener(stream::local_addr(&stream));
        let gauge = listener.map(|l| l.gauge.clone());
        let policy = self.policy.load_full();
        if listener.is_some_and(|l| l.proxy_protocol) {
            // First, so that the per-address limit counts the client the header names.
            match proxy_protocol::accept(&mut stream, policy.header_timeout).await {
                Ok(()) => {}
                Err(proxy_protocol::Malformed::Nothing) => return None,
                Err(e) => {
                    log::debug!("PROXY protocol header refused: {e:?}");
                    policy.refused.proxy_protocol.inc();
                    return None;
                }
            }
        }
        let slot = match self.connections.admit(stream::peer_ip(&stream), gauge) {
            Ok(slot) => slot,
            Err(over) => {
                policy.refused.over(over).inc();
                return None; // dropped: closed at once
            }
        };
        let stream: Stream = match listener.and_then(|l| l.tls.as_ref()) {
            Some(tls) => match tls.accept(stream, policy.header_timeout).await {
                Some(client) => Box::new(client),
                None => {
                    policy.refused.tls_handshake.inc();
                    return None;
                }
            },
            None => stream,
        };
        let mut client = if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2 has its own framing, which Pingora's h2 library checks strictly; the
            // stream only holds the connection to its preface's deadline.
            Box::new(ClientStream::h2(stream, policy, slot))
        } else {
            let h2c = listener.is_some_and(|l| l.h2c);
            Box::new(ClientStream::new(stream, policy, slot, h2c))
        };
        if !next_head(&mut client, shutdown).await {
            return None;
        }
        self.exchanges.process_new(client, shutdown).await
    }

    async fn cleanup(&self) {
        self.exchanges.app.http_cleanup().await
    }
}

/// How long a keep-alive connection that waits for its next request is still listened to
/// once the service starts shutting down (below every sensible `grace_period_seconds`).
const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// Waits for the connection's next request head. Once the service starts shutting down
/// the connection is not cut at once: a client that was already sending its next request
/// on it would see the connection reset under that request. It is listened to for
/// [`DRAIN_IDLE`] more (a request that comes is served, and its answer closes the
/// connection: Pingora turns keep-alive off while shutting down); then it is closed
/// cleanly (TLS `close_notify`, TCP FIN), which an idle client's pool notices before reuse.
async fn next_head(client: &mut ClientStream, shutdown: &ShutdownWatch) -> bool {
    let mut shutdown = shutdown.clone();
    if !*shutdown.borrow() {
        tokio::select! {
            biased;
            ready = client.next_head() => return ready,
            _ = shutdown.changed() => {}
        }
    }
    match tokio::time::timeout(DRAIN_IDLE, client.next_head()).await {
        Ok(ready) => ready,
        Err(_) => {
            Shutdown::shutdown(client).await;
            false
        }
    }
}

/// Pingora's HTTP application, with the end of every exchange reported to the stream.
pub struct Exchanges<A> {
    app: Arc<A>,
}

#[async_trait]
impl<A> HttpServerApp for Exchanges<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // The framer has checked where every pipelined request ends: Pingora may serve
        // them one after the other (RFC 9112 §9.3.2) instead of dropping the later ones.
        session.set_pipelining_enabled(true);
        let reused = self.app.process_new_http(session, shutdown).await?;
        let (stream, settings) = reused.consume();
        if !stream.as_any().is::<ClientStream>() {
            return Some(ReusedHttpStream::new(stream, settings));
        }
        let Ok(mut client) = stream.into_any().downcast::<ClientStream>() else {
            return None;
        };
        client.exchange_done();
        // Between requests the connection waits here, in the stream alone, rather than in
        // a new Pingora session.
        if !next_head(&mut client, shutdown).await {
            return None;
        }
        let stream: Stream = client;
        Some(ReusedHttpStream::new(stream, settings))
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.app.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.app.server_options()
    }

    async fn http_cleanup(&self) {
        self.app.http_cleanup().await
    }
}
