//! Upgraded connections: WebSocket, and any other `Upgrade` a client asks for on a proxy
//! route. The gateway sends the handshake to one backend of the route's upstream (its
//! `Connection: upgrade` and `Upgrade` kept), relays the backend's answer, and after a `101`
//! moves bytes both ways until either side closes or none has moved for the upstream's
//! `timeouts.tunnel`.
//!
//! It runs from `request_filter` on its own connection to the backend rather than through
//! Pingora's proxy loop: Pingora 0.9.1 ends a tunnel at once when the backend's `101`
//! reaches its upstream half before the (empty) request body's end does, which a backend
//! answering within microseconds makes happen about once in 500 handshakes. Here the
//! handshake is written, then answered, then the tunnel starts: no such order to lose.
//! A tunnel holds its backend lease while open, so `least_conn` sees long-lived sockets.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Version;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::protocols::http::v1::client::HttpSession as Http1Session;
use pingora_core::protocols::ALPN;
use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::Session;

use crate::config::{RouteConfig, Timeouts};
use crate::http::errors;
use crate::http::forwarding;
use crate::http::passage::Passage;
use crate::http::respond::{self, send_error};
use crate::upstream::{Lease, Tried, Upstream};

/// Whether a request becomes a tunnel: an upgrade without a request body (a body would
/// come before the protocol switch; such rare requests take the ordinary proxy path).
pub fn wanted(session: &Session) -> bool {
    let req = session.req_header();
    req.version == Version::HTTP_11
        && forwarding::is_upgrade(req)
        && !req.headers.contains_key(http::header::TRANSFER_ENCODING)
        && req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

/// Where a tunnel request goes.
pub struct TunnelTarget<'a> {
    pub upstream: &'a Arc<Upstream>,
    pub route: &'a RouteConfig,
    /// The client, and the path a `rewrite` made for the upstream.
    pub pass: &'a Passage,
    pub connector: &'a Connector,
    pub request_id: &'a str,
}

/// Serves an upgrade request to its end: the backend's answer relayed (a `101` and the
/// tunnel after it, or its refusal), or 502/503/504 when no backend answered. Returns the
/// backend that answered, for the access log; an error only when the client's side failed.
pub async fn serve(session: &mut Session, to: TunnelTarget<'_>) -> Result<Option<Arc<str>>> {
    let mut head = session.req_header().clone();
    forwarding::upstream_request(&mut head, to.route, to.pass, to.request_id)?;
    let config = &to.upstream.config;
    let idempotent = head.method.is_idempotent();
    let mut tried = Tried::default();
    let mut failed = None;
    // A handshake that could not connect moves on to each other backend once; one that
    // was sent and failed is sent again at most `retries` times.
    let mut resends = 0;
    loop {
        let Some(mut lease) = to
            .upstream
            .select_for(session.req_header(), &to.pass.client, &tried)
        else {
            break;
        };
        tried.add(lease.index());
        let label = Arc::clone(&lease.backend().label);
        match open(to.connector, &lease, &config.timeouts, &head).await {
            Ok(backend) => {
                relay(session, backend, &mut lease, &to).await?;
                return Ok(Some(label));
            }
            Err((e, sent)) => {
                lease.failed_with(&e);
                log::warn!(
                    "upgrade to backend {label} of upstream {} failed: {e}",
                    config.name
                );
                failed = Some((errors::status_for(&e), label));
                let again = match sent {
                    false => to.upstream.has_untried(&tried),
                    true => idempotent && resends < config.retries,
                };
                if !again {
                    break;
                }
                resends += u32::from(sent);
            }
        }
    }
    let (status, backend) = match failed {
        Some((status, label)) => (status, Some(label)),
        None => (503, None),
    };
    send_error(
        session,
        status,
        respond::reason(status),
        to.request_id,
        Vec::new(),
        true,
    )
    .await?;
    Ok(backend)
}

/// Connects to the leased backend (HTTP/1.1: an upgrade has no h2 form here), sends the
/// handshake and reads the answer's head. The error says whether the request was sent.
async fn open(
    connector: &Connector,
    lease: &Lease,
    timeouts: &Timeouts,
    head: &pingora_http::RequestHeader,
) -> std::result::Result<Http1Session, (Box<Error>, bool)> {
    let mut peer = lease.backend().peer();
    if peer.is_tls() {
        peer.options.alpn = ALPN::H1;
    }
    let (session, _reused) = connector
        .get_http_session(&*peer)
        .await
        .map_err(|e| (e.into_up(), false))?;
    let HttpSession::H1(mut backend) = session else {
        let e = Error::explain(ErrorType::ConnectError, "backend did not speak HTTP/1.1");
        return Err((e.into_up(), false));
    };
    backend.write_timeout = Some(timeouts.write);
    backend.read_timeout = Some(timeouts.read);
    let sent = |e: Box<Error>| (e.into_up(), true);
    let mut head = Box::new(head.clone());
    lease
        .backend()
        .set_host(&mut head)
        .map_err(|e| (e, false))?;
    backend
        .write_request_header(head)
        .await
        .map_err(|e| (e.into_up(), false))?;
    backend.finish_body().await.map_err(sent)?;
    loop {
        backend.read_response().await.map_err(sent)?;
        match backend.resp_header() {
            Some(h) if h.status.is_informational() && h.status.as_u16() != 101 => continue,
            Some(_) => return Ok(backend),
            None => {
                let e = Error::explain(ErrorType::InvalidHTTPHeader, "no response header");
                return Err(sent(e));
            }
        }
    }
}

/// Relays the backend's answer to the handshake. A `101` switches both connections to
/// bytes both ways; any other answer (the backend declined) goes to the client as usual.
async fn relay(
    session: &mut Session,
    mut backend: Http1Session,
    lease: &mut Lease,
    to: &TunnelTarget<'_>,
) -> Result<()> {
    let Some(mut resp) = backend.resp_header().cloned() else {
        return Error::e_explain(ErrorType::InternalError, "answer head vanished");
    };
    lease.answered(resp.status.as_u16());
    forwarding::response(&mut resp, Some(to.route), to.request_id)?;
    if !backend.was_upgraded() {
        if session.is_process_shutting_down() {
            session.as_downstream_mut().set_keepalive(None);
        }
        session.write_response_header(Box::new(resp), false).await?;
        while let Some(data) = backend.read_body_bytes().await? {
            session.write_response_body(Some(data), false).await?;
        }
        return session.write_response_body(None, true).await;
    }
    // Counted open from before the client can see the `101` until both sides are closed.
    let gauge = &to.upstream.tunnels_open;
    gauge.inc();
    let result = async {
        session.write_response_header(Box::new(resp), false).await?;
        backend.maybe_upgrade_body_writer();
        pump(session, &mut backend, to.upstream.config.timeouts.tunnel).await
    }
    .await;
    backend.shutdown().await;
    gauge.dec();
    result
}

/// Which side moved bytes, or closed (`None`).
enum Moved {
    FromClient(Result<Option<Bytes>>),
    FromBackend(Result<Option<Bytes>>),
}

/// Moves bytes both ways until either side closes or fails, or nothing moves (a read or a
/// write stalls) for `idle`.
async fn pump(session: &mut Session, backend: &mut Http1Session, idle: Duration) -> Result<()> {
    let client = session.as_downstream_mut();
    // The idle deadline below governs; Pingora's per-read ones would cut a quiet side off.
    client.set_read_timeout(None);
    backend.read_timeout = None;
    loop {
        let moved = tokio::time::timeout(idle, async {
            tokio::select! {
                got = client.read_request_body() => Moved::FromClient(got),
                got = backend.read_body_bytes() => Moved::FromBackend(got),
            }
        })
        .await;
        let step = match moved {
            Err(_) => return Ok(()), // idle: both sides are closed
            Ok(Moved::FromClient(Ok(Some(data)))) => {
                tokio::time::timeout(idle, backend.write_body(&data))
                    .await
                    .map(|r| r.map(drop))
            }
            Ok(Moved::FromBackend(Ok(Some(data)))) => {
                tokio::time::timeout(idle, client.write_response_body(data, false)).await
            }
            Ok(Moved::FromClient(Ok(None))) => return Ok(()),
            Ok(Moved::FromBackend(Ok(None))) => return client.finish_body().await,
            Ok(Moved::FromClient(Err(e)) | Moved::FromBackend(Err(e))) => {
                log::debug!("tunnel ended: {e}");
                return Ok(());
            }
        };
        match step {
            Err(_) => return Ok(()),
            Ok(Err(e)) => {
                log::debug!("tunnel ended: {e}");
                return Ok(());
            }
            Ok(Ok(())) => {}
        }
    }
}
