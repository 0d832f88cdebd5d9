//! TLS termination on a listener: [`Terminator`] runs the handshake of each admitted
//! connection (within `clients.header_timeout`, so a client that stalls its handshake holds
//! nothing longer than one that stalls its head), and [`TlsClient`] is the decrypted stream
//! that Pingora's HTTP server, and the edge's [`super::stream::ClientStream`] before it,
//! read. The certificate comes from the SNI resolver of [`crate::tls`]; ALPN says whether
//! the connection speaks h2 or HTTP/1.1.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A listener's TLS side. Its certificates and settings can be replaced while it serves
/// (a reload): handshakes started from then on use the new ones, open connections keep
/// theirs.
pub struct Terminator {
    config: ArcSwap<ServerConfig>,
}

impl Terminator {
    pub fn new(config: Arc<ServerConfig>) -> Terminator {
        Terminator {
            config: ArcSwap::new(config),
        }
    }

    /// Serves `config` to new handshakes.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        self.config.store(config);
    }

    /// Runs the handshake; `None` when it failed or did not finish within `limit`.
    pub async fn accept(&self, stream: Stream, limit: Duration) -> Option<TlsClient> {
        let acceptor = TlsAcceptor::from(self.config.load_full());
        let tls = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                log::debug!("TLS handshake failed: {e}");
                return None;
            }
            Err(_) => return None,
        };
        let session = tls.get_ref().1;
        let name = |s: Option<&'static str>| s.unwrap_or("unknown");
        let digest = SslDigest::new(
            name(
                session
                    .negotiated_cipher_suite()
                    .and_then(|s| s.suite().as_str()),
            ),
            name(session.protocol_version().and_then(|v| v.as_str())),
            None,
            None,
            Vec::new(),
        );
        let alpn = match session.alpn_protocol() {
            Some(b"h2") => Some(ALPN::H2),
            Some(b"http/1.1") => Some(ALPN::H1),
            _ => None,
        };
        Some(TlsClient {
            tls,
            digest: Arc::new(digest),
            alpn,
        })
    }
}

/// A client connection after its TLS handshake.
pub struct TlsClient {
    tls: TlsStream<Stream>,
    digest: Arc<SslDigest>,
    alpn: Option<ALPN>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("inner", self.tls.get_ref().0)
            .field("alpn", &self.alpn)
            .finish()
    }
}

impl TlsClient {
    fn inner(&self) -> &Stream {
        self.tls.get_ref().0
    }
}

impl AsyncRead for TlsClient {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsClient {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for TlsClient {
    async fn shutdown(&mut self) {
        // close_notify, then the TCP shutdown.
        let _ = AsyncWriteExt::shutdown(&mut self.tls).await;
    }
}

impl UniqueID for TlsClient {
    fn id(&self) -> UniqueIDType {
        self.inner().id()
    }
}

impl Ssl for TlsClient {
    fn get_ssl(&self) -> Option<&TlsRef> {
        None
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        Some(Arc::clone(&self.digest))
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.alpn.clone()
    }
}

impl GetTimingDigest for TlsClient {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner().get_write_pending_time()
    }
}

impl GetProxyDigest for TlsClient {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner().get_proxy_digest()
    }
}

impl GetSocketDigest for TlsClient {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.tls.get_mut().0.set_socket_digest(digest)
    }
}

/// Pingora peeks only for an h2c preface, which TLS connections never carry (ALPN says).
impl Peek for TlsClient {}
