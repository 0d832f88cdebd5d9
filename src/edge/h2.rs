//! HTTP/2 requests held to the rules HTTP/1.1 requests meet in [`super::framing`].
//!
//! An h2 request does not pass the byte-level framer: Pingora's h2 server (the `h2` codec)
//! decodes its frames and HPACK block and enforces RFC 9113's own rules (pseudo-headers,
//! connection-specific fields, CR/LF/NUL, conflicting `content-length`). What the codec
//! lets through and the HTTP/1.1 edge would not is checked here on the decoded head, before
//! routing, so a request means the same whichever protocol carried it:
//!
//! - `clients.max_headers` and `clients.max_header_bytes` (each field counted as the
//!   `name: value` line it becomes upstream) → 431; a `:path` longer than
//!   `clients.max_request_line` → 414;
//! - field names made of RFC 9110 token characters only (`x"a` is not one) → else 400;
//! - field values without leading or trailing SP/HTAB (RFC 9113 §8.2.1: malformed) and of
//!   visible characters, SP, HTAB or obs-text, a `host` of authority characters only
//!   → else 400;
//! - a `:scheme` other than `http`/`https` (RFC 9113 §8.3.1: not an HTTP request) → 400
//!   (a `#fragment` in `:path` never gets this far: the `http` crate's URI parser drops
//!   it, so it is not forwarded either);
//! - `content-length` as one field holding one plain decimal value: identical duplicates,
//!   which the codec reconciles but would forward as two lines, are refused as HTTP/1.1's
//!   framer refuses them → else 400.
//!
//! One thing cannot be known from the head: whether a stream that declares
//! `content-length: 0` and is not yet ended really carries no data. [`declares_empty_body`]
//! says when to wait for its end before forwarding anything ([`await_empty_end`]): the
//! codec resets a stream whose DATA contradicts its length, and nothing went upstream.

use std::time::Duration;

use pingora_http::RequestHeader;
use pingora_proxy::Session;

use super::framing::{host_char, ows, tchar, value_char, Limits, Reject};

/// `: ` and CRLF around each field once written as an HTTP/1.1 line.
const LINE_OVERHEAD: usize = 4;

/// Checks a decoded HTTP/2 request head against the edge's limits and field grammar.
pub fn check(req: &RequestHeader, limits: &Limits) -> Result<(), Reject> {
    if req.raw_path().len() > limits.max_request_line {
        return Err(Reject::TargetTooLong);
    }
    if req
        .uri
        .scheme_str()
        .is_some_and(|s| !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https"))
    {
        return Err(Reject::Bad(":scheme is not http or https"));
    }
    if req.headers.len() > limits.max_headers {
        return Err(Reject::HeadersTooLarge);
    }
    let mut bytes = 0usize;
    let mut lengths = 0usize;
    for (name, value) in &req.headers {
        bytes += name.as_str().len() + value.len() + LINE_OVERHEAD;
        if bytes > limits.max_header_bytes {
            return Err(Reject::HeadersTooLarge);
        }
        if !name.as_str().bytes().all(tchar) {
            return Err(Reject::Bad("invalid character in a header name"));
        }
        let v = value.as_bytes();
        if v.first().is_some_and(|&b| ows(b)) || v.last().is_some_and(|&b| ows(b)) {
            return Err(Reject::Bad("whitespace around a header value"));
        }
        if !v.iter().all(|&b| value_char(b)) {
            return Err(Reject::Bad("control character in a header field"));
        }
        if name == http::header::HOST && !v.iter().all(|&b| host_char(b)) {
            return Err(Reject::Bad("invalid Host"));
        }
        if name == http::header::CONTENT_LENGTH {
            lengths += 1;
            if lengths > 1 || v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Err(Reject::Bad("Content-Length is not one decimal number"));
            }
        }
    }
    Ok(())
}

/// An h2 request that declares `content-length: 0`: its stream may still carry frames
/// (an empty DATA or trailers to end it, legitimately; data, which makes it malformed).
pub fn declares_empty_body(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_2
        && req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0")
}

/// Waits, at most `limit`, for the end of a stream that declared an empty body. `Err`: the
/// stream broke its declaration (the codec has reset it), was reset by the client, or did
/// not end in time; the request must not be forwarded.
pub async fn await_empty_end(session: &mut Session, limit: Duration) -> Result<(), Reject> {
    let ended = tokio::time::timeout(limit, async {
        loop {
            match session.read_request_body().await {
                Ok(None) => return Ok(()),
                Ok(Some(data)) if data.is_empty() => continue,
                Ok(Some(_)) | Err(_) => {
                    return Err(Reject::Bad("body contradicts Content-Length: 0"))
                }
            }
        }
    })
    .await;
    ended.unwrap_or(Err(Reject::Bad("stream not ended after Content-Length: 0")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(fields: &[(&str, &[u8])]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/a", None).unwrap();
        req.set_version(http::Version::HTTP_2);
        for (name, value) in fields {
            req.append_header(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(value).unwrap(),
            )
            .unwrap();
        }
        req
    }

    #[test]
    fn fields_follow_the_http11_grammar() {
        let limits = Limits::default();
        let ok = |f: &[(&str, &[u8])]| check(&head(f), &limits);
        assert_eq!(ok(&[("x-a", b"b c")]), Ok(()));
        assert_eq!(ok(&[("content-length", b"12")]), Ok(()));
        for bad in [
            &[("x-a", &b" b"[..])][..],
            &[("x-a", b"b\t")],
            &[("content-length", b"1"), ("content-length", b"1")],
            &[("content-length", b"1,1")],
            &[("content-length", b"+1")],
        ] {
            assert!(matches!(ok(bad), Err(Reject::Bad(_))), "{bad:?}");
        }
    }

    #[test]
    fn limits_apply() {
        let limits = Limits {
            max_request_line: 8,
            max_header_bytes: 40,
            max_headers: 2,
        };
        let many = [("a", &b"1"[..]), ("b", b"2"), ("c", b"3")];
        assert_eq!(check(&head(&many), &limits), Err(Reject::HeadersTooLarge));
        let big = [("a", &[b'x'; 40][..])];
        assert_eq!(check(&head(&big), &limits), Err(Reject::HeadersTooLarge));
        let mut long = head(&[]);
        long.set_raw_path(b"/123456789").unwrap();
        assert_eq!(check(&long, &limits), Err(Reject::TargetTooLong));
    }
}
