//! Answers the gateway writes itself: short JSON error bodies
//! (`{"error": "...", "request_id": "..."}`), the gateway's own answers ([`Stop`]) and
//! `100 Continue`. Which status a failure gets is [`super::errors`]' business.

use bytes::Bytes;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use serde_json::json;

pub use super::answer::reason;
use super::answer::{Stop, StopBody};
use super::request_id;

/// The JSON body of an error answer.
pub fn error_body(message: &str, request_id: &str) -> Bytes {
    Bytes::from(json!({ "error": message, "request_id": request_id }).to_string())
}

/// Writes a complete JSON error answer; `extra` headers are added to it. With `close`, the
/// answer says `Connection: close` and the connection is not reused (the request's body
/// was not read, or the proxy will drop the connection), so no keep-alive client sends its
/// next request into a closing socket.
pub async fn send_error(
    session: &mut Session,
    status: u16,
    message: &'static str,
    request_id: &str,
    extra: Vec<(http::HeaderName, http::HeaderValue)>,
    close: bool,
) -> Result<()> {
    let stop = Stop {
        status,
        headers: extra,
        body: StopBody::Error(message),
        denied: None,
    };
    send_stop(session, stop, request_id, close, |_| {}).await
}

/// Writes an answer a route's filter (or a redirect route) gave: its status and headers,
/// its body (the JSON error body, nothing, or a body relayed from an auth service), after
/// `finish` has added to the head what the route's filters add to every answer (CORS).
pub async fn send_stop(
    session: &mut Session,
    stop: Stop,
    request_id: &str,
    close: bool,
    finish: impl FnOnce(&mut ResponseHeader),
) -> Result<()> {
    let (body, content_type) = match stop.body {
        StopBody::Error(message) => (
            error_body(message, request_id),
            Some(http::HeaderValue::from_static("application/json")),
        ),
        StopBody::Empty => (Bytes::new(), None),
        StopBody::Relayed(body, content_type) => (body, content_type),
    };
    let mut resp = ResponseHeader::build(stop.status, Some(4 + stop.headers.len()))?;
    for (name, value) in stop.headers {
        resp.append_header(name, value)?;
    }
    if let Some(ct) = content_type {
        resp.insert_header(http::header::CONTENT_TYPE, ct)?;
    }
    if stop.status != 204 {
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    }
    resp.insert_header(request_id::HEADER, request_id)?;
    finish(&mut resp);
    if close || session.is_process_shutting_down() {
        session.as_downstream_mut().set_keepalive(None);
        resp.insert_header("connection", "close")?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), body.is_empty() || head_only)
        .await?;
    if body.is_empty() || head_only {
        return Ok(());
    }
    session.write_response_body(Some(body), true).await
}

/// Tells an HTTP/1.1 client that waits with `Expect: 100-continue` to send its body. (Pingora's
/// h2 server drops informational answers: an h2 client waits out its own timer instead.)
pub async fn send_continue(session: &mut Session) -> Result<()> {
    let downstream = session.as_downstream_mut();
    if downstream.is_http2() || downstream.req_header().version != http::Version::HTTP_11 {
        return Ok(());
    }
    let head = ResponseHeader::build(100, Some(0))?;
    downstream.write_response_header(Box::new(head)).await
}
