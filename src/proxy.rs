//! The `ProxyHttp` implementation: Pingora's request phases, each delegating to the module
//! that owns the concern. Read top to bottom it is the life of a request:
//!
//! 1. `request_filter`: count it, settle its request id, route it (404/405 answered here).
//! 2. `upstream_peer`: lease a backend from the route's upstream (503 when none is left).
//! 3. `upstream_request_filter` / `upstream_response_filter` / `response_filter`: headers
//!    and per-backend outcomes.
//! 4. `fail_to_connect` / `error_while_proxy`: decide retries (a connect failure, or an
//!    idempotent request that failed before any answer reached the client, goes to another
//!    backend while the upstream's `retries` allow).
//! 5. `fail_to_proxy`: the JSON error answer (502, 503, 504).
//! 6. `logging`: metrics and totals; the backend lease is released here at the latest.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::header;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::config::{Balance, KeySource, RouteId, RouteKind};
use crate::gateway::{Gateway, Route};
use crate::request_id;
use crate::respond::{self, send_error};
use crate::routing::RouteMatch;
use crate::upstream::{Lease, Tried};

pub struct FanoutProxy {
    gw: Arc<Gateway>,
}

impl FanoutProxy {
    pub fn new(gw: Arc<Gateway>) -> Self {
        FanoutProxy { gw }
    }

    fn route(&self, ctx: &RequestCtx) -> Option<&Route> {
        ctx.route.map(|id| &self.gw.routes[id])
    }

    fn retries(&self, ctx: &RequestCtx) -> u32 {
        self.route(ctx)
            .and_then(Route::upstream)
            .map_or(0, |u| self.gw.upstreams[u].config.retries)
    }
}

/// Per-request state carried through the phases.
pub struct RequestCtx {
    start: Instant,
    request_id: String,
    route: Option<RouteId>,
    /// The backend currently serving this request; dropping it releases its in-flight slot.
    lease: Option<Lease>,
    tried: Tried,
    attempts: u32,
}

/// Counts a failed attempt on the backend it was made to.
fn count_failure(ctx: &RequestCtx, e: &Error) {
    if let Some(lease) = &ctx.lease {
        let o = &lease.backend().outcomes;
        if respond::is_timeout(e) {
            o.timeout.inc();
        } else {
            o.error.inc();
        }
    }
}

/// The consistent-hashing key of a request; `buf` holds a client IP's bytes.
fn hash_key<'a>(session: &'a Session, key: &KeySource, buf: &'a mut [u8; 16]) -> &'a [u8] {
    let req = session.req_header();
    match key {
        KeySource::ClientIp => match session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            Some(IpAddr::V4(ip)) => {
                buf[..4].copy_from_slice(&ip.octets());
                &buf[..4]
            }
            Some(IpAddr::V6(ip)) => {
                buf.copy_from_slice(&ip.octets());
                &buf[..]
            }
            None => b"",
        },
        KeySource::Path => req.uri.path().as_bytes(),
        KeySource::Header(name) => req.headers.get(name).map_or(b"", |v| v.as_bytes()),
        KeySource::Global => b"",
    }
}

#[async_trait]
impl ProxyHttp for FanoutProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            request_id: String::new(),
            route: None,
            lease: None,
            tried: Tried::default(),
            attempts: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        self.gw.metrics.totals.count_request();
        let req = session.req_header();
        ctx.request_id =
            request_id::from_client(req.headers.get(request_id::HEADER).map(|v| v.as_bytes()));
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.host());
        let status = match self.gw.router.lookup(host, req.uri.path(), &req.method) {
            RouteMatch::Found(id) => {
                ctx.route = Some(id);
                match self.gw.routes[id].config.kind {
                    RouteKind::Proxy { .. } => return Ok(false),
                    // Broadcast delivery arrives with its own issue; say so rather than guess.
                    RouteKind::Broadcast { .. } => 501,
                }
            }
            RouteMatch::MethodNotAllowed => 405,
            RouteMatch::NotFound => 404,
        };
        send_error(
            session,
            status,
            respond::reason(status),
            &ctx.request_id,
            &[],
        )
        .await?;
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let upstream = self
            .route(ctx)
            .and_then(Route::upstream)
            .map(|u| &self.gw.upstreams[u])
            .ok_or_else(|| {
                Error::explain(ErrorType::InternalError, "request has no proxy route")
            })?;
        let mut buf = [0u8; 16];
        let key: &[u8] = match upstream.config.balance {
            Balance::ConsistentHash => hash_key(session, &upstream.config.hash_key, &mut buf),
            _ => b"",
        };
        // Release the previous attempt's slot before choosing, so least_conn sees true loads.
        ctx.lease = None;
        let lease = upstream
            .select(key, &ctx.tried)
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no healthy backend"))?;
        ctx.tried.add(lease.index());
        ctx.attempts += 1;
        let peer = lease.backend().peer();
        ctx.lease = Some(lease);
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_request.insert_header(request_id::HEADER, ctx.request_id.as_str())?;
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status;
        if let (Some(lease), false) = (&ctx.lease, status.is_informational()) {
            let o = &lease.backend().outcomes;
            if status.is_server_error() {
                o.error.inc();
            } else {
                o.ok.inc();
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_response.insert_header(request_id::HEADER, ctx.request_id.as_str())?;
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        count_failure(ctx, &e);
        // Nothing reached the backend: any request may go to another one.
        e.set_retry(ctx.attempts <= self.retries(ctx));
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        count_failure(ctx, &e);
        let downstream = session.as_downstream();
        let safe = session.req_header().method.is_idempotent()
            && !downstream.retry_buffer_truncated()
            && downstream.response_written().is_none();
        e.set_retry(safe && ctx.attempts <= self.retries(ctx));
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = respond::status_for(e);
        // Only answer if no answer has started; otherwise the connection is simply closed.
        if code > 0 && session.as_downstream().response_written().is_none() {
            if let Err(write_error) =
                send_error(session, code, respond::reason(code), &ctx.request_id, &[]).await
            {
                log::debug!("could not send the {code} answer: {write_error}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.lease = None;
        let status = session
            .as_downstream()
            .response_written()
            .map_or(0, |r| r.status.as_u16());
        let route_metrics = self.route(ctx).map_or(&self.gw.unrouted, |r| &r.metrics);
        route_metrics.observe(&self.gw.metrics, status, ctx.start.elapsed().as_secs_f64());
        self.gw.metrics.totals.count_answer(status, e.is_some());
    }
}
