//! The end of a request: its span closed with what it came to, and the small measures the
//! access log and metrics use.

use super::*;

/// The request's span when `tracer` samples it (parent-based, else `sample`); the trace
/// context then names it as the parent of what the request sends.
pub(super) fn traced(tracer: &Arc<span::Tracer>, trace: &mut Trace) -> Option<Span> {
    let from_client = trace.origin == Origin::Client;
    if !tracer.samples(&trace.parent, from_client) {
        return None;
    }
    let span = tracer.span(trace.parent, from_client, "request", Kind::Server, None);
    trace.span = Some(span.span_id());
    Some(span)
}

/// Names the request's span after its method and route, notes what became of it, and
/// ends it.
pub(super) fn finish_request_span(
    mut span: Span,
    session: &Session,
    ctx: &RequestCtx,
    route: Option<&Route>,
    status: u16,
    e: Option<&Error>,
) {
    let req = session.req_header();
    let route_label = route.map_or("unrouted", |r| &**r.metrics.label());
    span.rename(format!("{} {route_label}", req.method));
    span.attr("http.request.method", req.method.to_string());
    span.attr("url.path", req.uri.path().to_string());
    span.attr("http.route", route_label.to_string());
    span.attr("http.response.status_code", i64::from(status));
    span.attr("fanout.request_id", ctx.request_id.clone());
    if let Some(ip) = ctx.pass.client.ip {
        span.attr("client.address", ip.to_string());
    }
    let downstream = session.as_downstream();
    span.attr(
        "http.request.body.size",
        downstream.body_bytes_read() as i64,
    );
    span.attr(
        "http.response.body.size",
        downstream.body_bytes_sent() as i64,
    );
    if let Some(u) = ctx
        .routed
        .as_ref()
        .and_then(|r| r.failover.answered_by())
        .or(ctx.pass.upstream)
        .or_else(|| route.and_then(Route::upstream))
    {
        span.attr("fanout.upstream", ctx.gen.upstreams[u].name().to_string());
    }
    match e {
        Some(e) => span.fail(e.to_string()),
        None if status >= 500 => span.fail(format!("answered {status}")),
        None => {}
    }
}

/// The client's protocol, for the access log.
pub(super) fn protocol(session: &Session) -> &'static str {
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    match (session.req_header().version, tls) {
        (http::Version::HTTP_2, true) => "HTTP/2+tls",
        (http::Version::HTTP_2, false) => "HTTP/2",
        (http::Version::HTTP_10, true) => "HTTP/1.0+tls",
        (http::Version::HTTP_10, false) => "HTTP/1.0",
        (_, true) => "HTTP/1.1+tls",
        (_, false) => "HTTP/1.1",
    }
}

/// Milliseconds with microsecond precision.
pub(super) fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}
