//! Requests the gateway sends on its own account — mirror copies, fallback copies and
//! broadcast deliveries — straight through Pingora's HTTP connector and its keep-alive
//! pool. No client session stands behind them, so they pass through none of the proxy's
//! phases: the caller shapes the request head and leases the backend (so the target
//! upstream's balancing, health checks and breakers apply), and [`exchange`] sends the
//! request, streams or writes its body, reads the answer (discarding or keeping its body),
//! returns the connection to the pool and reports the outcome to the lease.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_error::{Error, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::sync::{mpsc, watch};

use crate::config::Timeouts;
use crate::mirror::compare::{Reduce, Seen};
use crate::upstream::Lease;

/// One piece of a streamed body: `data` (if any), and whether it is the last piece.
pub struct Piece {
    pub data: Option<Bytes>,
    pub end: bool,
}

/// The body of an outbound request.
pub enum Body {
    Empty,
    /// A body read in full (it can be sent again on a fresh connection).
    Full(Bytes),
    /// A body still arriving from the client; the sender going away before the last piece
    /// aborts the exchange, so a partial body is never sent as complete.
    Stream(mpsc::Receiver<Piece>),
}

impl Body {
    fn replayable(&self) -> bool {
        !matches!(self, Body::Stream(_))
    }
}

/// What to do with the answer's body.
#[derive(Clone, Copy)]
pub enum Keep {
    Discard,
    /// Keep up to this many bytes; a longer body makes the exchange fail as [`Failure::TooLarge`].
    UpTo(u64),
    /// Reduce the answer for a mirror comparison as it streams past ([`Reduce`]).
    Digest(Reduce),
}

/// A complete answer. With [`Keep::Discard`] only its status is kept.
pub struct Answer {
    pub status: u16,
    /// How long the answer's `Retry-After` asks to wait.
    pub retry_after: Option<Duration>,
    /// The head and body, with [`Keep::UpTo`].
    pub kept: Option<(ResponseHeader, Bytes)>,
    /// The answer reduced, with [`Keep::Digest`].
    pub seen: Option<Seen>,
}

/// What [`read_answer`] keeps of an answer.
#[derive(Default)]
struct Read {
    kept: Option<(ResponseHeader, Bytes)>,
    seen: Option<Seen>,
}

/// Why an exchange has no answer.
#[derive(Debug)]
pub enum Failure {
    /// Connecting, writing or reading failed (reported to the backend).
    Upstream(Box<Error>),
    /// The exchange ran past its limit (reported to the backend as a timeout).
    Timeout,
    /// The answer came but its body was longer than [`Keep::UpTo`] allowed.
    TooLarge,
    /// The streamed body stopped before its end (the client's request failed).
    BodyAborted,
    /// The request was sent, and its answer was no longer wanted (see [`exchange_until`]).
    Unwanted,
}

/// Sends one request to the leased backend and reads its answer, within `limit` overall
/// and the upstream's per-operation `timeouts`. The outcome is reported to `lease`: an
/// answer by its status, a failure to connect, write or read as an error or a timeout.
/// A connection taken from the pool that turns out dead is replaced once when the body
/// can be sent again.
pub async fn exchange(
    connector: &Connector,
    lease: &mut Lease,
    timeouts: &Timeouts,
    limit: Duration,
    header: &RequestHeader,
    body: Body,
    keep: Keep,
) -> Result<Answer, Failure> {
    exchange_until(connector, lease, timeouts, limit, header, body, keep, None).await
}

/// [`exchange`], except that once the request is sent, the wait for its answer ends (as
/// [`Failure::Unwanted`], the connection closed) as soon as `wanted`'s sender is gone: a
/// fallback copy whose primary has answered frees its connection and memory at once.
#[allow(clippy::too_many_arguments)]
pub async fn exchange_until(
    connector: &Connector,
    lease: &mut Lease,
    timeouts: &Timeouts,
    limit: Duration,
    header: &RequestHeader,
    mut body: Body,
    keep: Keep,
    mut wanted: Option<watch::Receiver<()>>,
) -> Result<Answer, Failure> {
    let attempts = async {
        let mut first = true;
        loop {
            let wanted = wanted.as_mut();
            match attempt(connector, lease, timeouts, header, &mut body, keep, wanted).await {
                Err((Failure::Upstream(_), true)) if first && body.replayable() => first = false,
                other => return other.map_err(|(f, _)| f),
            }
        }
    };
    let result = match tokio::time::timeout(limit, attempts).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout),
    };
    match &result {
        Ok(answer) => lease.answered(answer.status),
        Err(Failure::TooLarge) => {}
        Err(Failure::Upstream(e)) => lease.failed_with(e),
        Err(Failure::Timeout) => lease.failed(true),
        Err(Failure::BodyAborted | Failure::Unwanted) => {}
    }
    result
}

/// One try on one connection. The error carries whether the connection came from the pool
/// and failed before any answer byte (worth one more try on another connection).
async fn attempt(
    connector: &Connector,
    lease: &Lease,
    timeouts: &Timeouts,
    header: &RequestHeader,
    body: &mut Body,
    keep: Keep,
    wanted: Option<&mut watch::Receiver<()>>,
) -> Result<Answer, (Failure, bool)> {
    let peer = lease.backend().peer();
    let upstream = |e| (Failure::Upstream(e), false);
    let (mut session, reused) = connector.get_http_session(&*peer).await.map_err(upstream)?;
    session.set_write_timeout(Some(timeouts.write));
    session.set_read_timeout(Some(timeouts.read));
    let stale = |e| (Failure::Upstream(e), reused);
    let mut header = Box::new(header.clone());
    lease
        .backend()
        .set_host(&mut header)
        .map_err(|e| (Failure::Upstream(e), false))?;
    session.write_request_header(header).await.map_err(stale)?;
    match body {
        Body::Empty => {}
        Body::Full(bytes) => {
            if !bytes.is_empty() {
                session
                    .write_request_body(bytes.clone(), true)
                    .await
                    .map_err(stale)?;
            }
        }
        Body::Stream(pieces) => loop {
            let Some(piece) = pieces.recv().await else {
                return Err((Failure::BodyAborted, false));
            };
            // An empty piece is never written: in chunked encoding it would be the
            // terminator, and `finish_request_body` writes that once.
            if let Some(data) = piece.data.filter(|d| !d.is_empty()) {
                session
                    .write_request_body(data, piece.end)
                    .await
                    .map_err(upstream)?;
            }
            if piece.end {
                break;
            }
        },
    }
    session.finish_request_body().await.map_err(stale)?;
    let answer = read_answer(&mut session, keep, reused);
    let (status, Read { kept, seen }) = match wanted {
        None => answer.await?,
        Some(wanted) => tokio::select! {
            answer = answer => answer?,
            // Values are never sent: this returns when the sender is dropped.
            _ = wanted.changed() => return Err((Failure::Unwanted, false)),
        },
    };
    let retry_after = session.response_header().and_then(retry_after);
    connector
        .release_http_session(session, &*peer, Some(timeouts.idle))
        .await;
    Ok(Answer {
        status,
        retry_after,
        kept,
        seen,
    })
}

/// Reads the answer's head and body (keeping the body as `keep` says). A pooled
/// (`reused`) connection that fails before the head is worth another try.
async fn read_answer(
    session: &mut HttpSession,
    keep: Keep,
    reused: bool,
) -> Result<(u16, Read), (Failure, bool)> {
    let status = read_final_header(session)
        .await
        .map_err(|e| (Failure::Upstream(e), reused))?;
    let read = match keep {
        Keep::Discard => {
            while read_chunk(session).await?.is_some() {}
            Read::default()
        }
        Keep::Digest(reduce) => {
            let headers = session
                .response_header()
                .map(|h| h.headers.clone())
                .unwrap_or_default();
            let mut digest = reduce.digest(&headers);
            while let Some(chunk) = read_chunk(session).await? {
                digest.update(&chunk);
            }
            Read {
                kept: None,
                seen: Some(digest.finish(status, headers)),
            }
        }
        Keep::UpTo(max) => {
            let header = session.response_header().cloned();
            let mut body = BytesMut::new();
            while let Some(chunk) = read_chunk(session).await? {
                if (body.len() + chunk.len()) as u64 > max {
                    return Err((Failure::TooLarge, false));
                }
                body.extend_from_slice(&chunk);
            }
            Read {
                kept: header.map(|h| (h, body.freeze())),
                seen: None,
            }
        }
    };
    Ok((status, read))
}

/// Reads answer heads until a final one (1xx heads are skipped); returns its status.
async fn read_final_header(session: &mut HttpSession) -> pingora_error::Result<u16> {
    loop {
        session.read_response_header().await?;
        let Some(h) = session.response_header() else {
            return Error::e_explain(ErrorType::InvalidHTTPHeader, "no response header");
        };
        if !h.status.is_informational() || h.status == http::StatusCode::SWITCHING_PROTOCOLS {
            return Ok(h.status.as_u16());
        }
    }
}

async fn read_chunk(session: &mut HttpSession) -> Result<Option<Bytes>, (Failure, bool)> {
    session
        .read_response_body()
        .await
        .map_err(|e| (Failure::Upstream(e), false))
}

/// `Retry-After` as a wait: delay-seconds, or an HTTP date (RFC 9110 §10.2.3).
pub fn retry_after(h: &ResponseHeader) -> Option<Duration> {
    let v = h
        .headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let wait = at.timestamp() - chrono::Utc::now().timestamp();
    Some(Duration::from_secs(wait.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let with = |v: &str| {
            let mut h = ResponseHeader::build(503, None).unwrap();
            h.insert_header("retry-after", v).unwrap();
            retry_after(&h)
        };
        assert_eq!(with("7"), Some(Duration::from_secs(7)));
        assert_eq!(with("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(100)).to_rfc2822();
        assert!(with(&later).is_some_and(|d| d >= Duration::from_secs(98)));
        assert_eq!(with("soon"), None);
    }
}
