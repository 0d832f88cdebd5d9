//! What a request must respect before and while it is proxied: unambiguous framing (a
//! request with both `Content-Length` and `Transfer-Encoding` is refused, closing a
//! request-smuggling door Pingora leaves open; Pingora itself refuses bad request lines,
//! bad header names and conflicting `Content-Length`s) and the route's `max_body_bytes`,
//! checked on the declared length before anything goes upstream and counted chunk by chunk
//! while a body streams, without ever buffering it.

use bytes::Bytes;
use pingora_http::RequestHeader;

/// Why a request was refused before being proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: ambiguous framing.
    BadFraming,
    /// 413: declared or streamed body over the limit.
    TooLarge,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::BadFraming => 400,
            Refusal::TooLarge => 413,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::BadFraming => "conflicting Content-Length and Transfer-Encoding",
            Refusal::TooLarge => "request body too large",
        }
    }
}

/// Refuses a request that declares both `Content-Length` and `Transfer-Encoding`. Pingora
/// parses such a request by its `Transfer-Encoding` and drops the `Content-Length` header
/// (RFC 9112 §6.3 allows either), so the parsed headers alone cannot show the conflict:
/// `raw_head` gives the header block as received, consulted only when `Transfer-Encoding`
/// is present.
pub fn check_framing(
    req: &RequestHeader,
    raw_head: impl FnOnce() -> Option<Bytes>,
) -> Result<(), Refusal> {
    let h = &req.headers;
    if !h.contains_key(http::header::TRANSFER_ENCODING) {
        return Ok(());
    }
    if h.contains_key(http::header::CONTENT_LENGTH)
        || raw_head().is_some_and(|raw| declares_content_length(&raw))
    {
        return Err(Refusal::BadFraming);
    }
    Ok(())
}

/// Whether a raw request head has a `Content-Length` line.
fn declares_content_length(raw: &[u8]) -> bool {
    const NAME: &[u8] = b"content-length:";
    raw.split(|&b| b == b'\n')
        .skip(1)
        .any(|line| line.len() >= NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME))
}

/// The body a request's head declares: whether it has one (chunked, or a non-zero
/// Content-Length), and its length when Content-Length gives it.
pub fn declared_body(req: &RequestHeader) -> (bool, Option<u64>) {
    // Pingora has already refused unparsable and conflicting lengths; take the first.
    let declared = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let chunked = req.headers.contains_key(http::header::TRANSFER_ENCODING);
    (chunked || declared.is_some_and(|n| n > 0), declared)
}

/// Refuses a declared body length over `max_body_bytes`.
pub fn check_length(req: &RequestHeader, max_body_bytes: u64) -> Result<(), Refusal> {
    match declared_body(req).1 {
        Some(n) if n > max_body_bytes => Err(Refusal::TooLarge),
        _ => Ok(()),
    }
}

/// Counts a streaming body against its limit.
#[derive(Debug, Default, Clone, Copy)]
pub struct BodyCounter {
    seen: u64,
}

impl BodyCounter {
    /// Adds a chunk; `Err` once the total exceeds `limit`.
    pub fn add(&mut self, chunk: usize, limit: u64) -> Result<(), Refusal> {
        self.seen = self.seen.saturating_add(chunk as u64);
        if self.seen > limit {
            Err(Refusal::TooLarge)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn framing_and_declared_length() {
        let none = || None;
        assert_eq!(check_length(&req(&[("content-length", "10")]), 10), Ok(()));
        assert_eq!(
            check_length(&req(&[("content-length", "11")]), 10),
            Err(Refusal::TooLarge)
        );
        assert_eq!(
            check_framing(&req(&[("transfer-encoding", "chunked")]), none),
            Ok(())
        );
        assert_eq!(
            check_framing(
                &req(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
                none
            ),
            Err(Refusal::BadFraming)
        );
        // As Pingora hands it over: Content-Length already dropped, still in the raw head.
        let raw = || {
            Some(Bytes::from_static(b"POST / HTTP/1.1\r\nHost: x\r\nCONTENT-LENGTH: 5\r\nTransfer-Encoding: chunked\r\n\r\n"))
        };
        assert_eq!(
            check_framing(&req(&[("transfer-encoding", "chunked")]), raw),
            Err(Refusal::BadFraming)
        );
        let clean = || {
            Some(Bytes::from_static(
                b"POST / HTTP/1.1\r\nX-Content-Length: 5\r\n\r\n",
            ))
        };
        assert_eq!(
            check_framing(&req(&[("transfer-encoding", "chunked")]), clean),
            Ok(())
        );
    }

    #[test]
    fn streamed_bodies_are_counted() {
        let mut c = BodyCounter::default();
        assert!(c.add(6, 10).is_ok());
        assert!(c.add(4, 10).is_ok());
        assert_eq!(c.add(1, 10), Err(Refusal::TooLarge));
    }
}
