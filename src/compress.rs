//! Response compression (`compress:` on a route), with the encoders of Pingora's
//! compression module (gzip, brotli, zstd) but without its downstream module: a route
//! that does not compress pays nothing, and a route that does compresses the upstream's
//! answer before the cache stores it, so that a stored compressed variant is served to
//! the clients that accept it without being compressed again on every hit.
//!
//! An answer is compressed when all of these hold: the request is not a `HEAD` and asks
//! for no range; the status is not 1xx, 204, 206 or 304; the answer has no
//! `Content-Encoding` and no `Cache-Control: no-transform`; its media type is one of the
//! route's `types`; its `Content-Length`, if it states one, is at least `min_size` (an
//! answer of unknown length is compressed as it streams); and the client's
//! `Accept-Encoding` (q-values honoured, `*` included) accepts one of the route's
//! `algorithms`, the first of which it accepts is used. Every answer that could have been
//! compressed says `Vary: Accept-Encoding`; a compressed one loses `Content-Length` and
//! `Accept-Ranges`, and a strong `ETag` becomes weak. Levels are chosen for speed (gzip 1,
//! brotli 1, zstd 1).

use bytes::Bytes;
use http::header::{self, HeaderValue};
use pingora_core::protocols::http::compression::{Algorithm, Encode};
use pingora_http::{RequestHeader, ResponseHeader};
use prometheus::IntCounter;

use crate::config::{Coding, CompressConfig};
use crate::observe::metrics::Metrics;

/// A route's compression.
pub struct Compress {
    algorithms: Vec<Coding>,
    min_size: u64,
    /// Exact media types, and the prefixes of `x/*` entries (`text/`).
    exact: Vec<String>,
    prefixes: Vec<String>,
    /// Suffix patterns such as `application/*+json`: (prefix, suffix).
    suffixed: Vec<(String, String)>,
    /// `fanout_compressed_responses_total`, by [`Coding::ALL`] order.
    compressed: [IntCounter; 3],
}

/// The compression of one answer as it streams.
pub struct Encoder(Box<dyn Encode + Send + Sync>);

impl Encoder {
    /// Replaces a piece of the answer's body by its compressed form (`end`: the last one).
    pub fn feed(&mut self, body: &mut Option<Bytes>, end: bool) {
        let input = body.as_deref().unwrap_or(&[]);
        if input.is_empty() && !end {
            return;
        }
        match self.0.encode(input, end) {
            Ok(out) => *body = Some(out),
            Err(e) => log::warn!("compression failed: {e}"),
        }
    }
}

/// The encoder of a coding, at the level chosen for speed.
fn encoder(coding: Coding) -> Option<Box<dyn Encode + Send + Sync>> {
    match coding {
        Coding::Gzip => Algorithm::Gzip.compressor(1),
        Coding::Zstd => Algorithm::Zstd.compressor(1),
        Coding::Br => Some(Box::new(Brotli::new(1))),
    }
}

/// Brotli through the `brotli` crate's writer, closed at the end of the body. (Pingora
/// 0.9.1's brotli `Compressor` only flushes at the end and never writes the stream's last
/// block, so a strict decoder refuses what it makes.)
struct Brotli {
    writer: Option<brotli::CompressorWriter<Vec<u8>>>,
    total_in: usize,
    total_out: usize,
    duration: std::time::Duration,
}

impl Brotli {
    fn new(level: u32) -> Brotli {
        Brotli {
            writer: Some(brotli::CompressorWriter::new(Vec::new(), 4096, level, 19)),
            total_in: 0,
            total_out: 0,
            duration: std::time::Duration::ZERO,
        }
    }
}

impl Encode for Brotli {
    fn encode(&mut self, input: &[u8], end: bool) -> pingora_error::Result<Bytes> {
        use std::io::Write;
        let start = std::time::Instant::now();
        let Some(writer) = self.writer.as_mut() else {
            return Ok(Bytes::new());
        };
        self.total_in += input.len();
        if let Err(e) = writer.write_all(input) {
            return pingora_error::Error::e_explain(
                pingora_error::ErrorType::InternalError,
                format!("brotli: {e}"),
            );
        }
        let out: Vec<u8> = if end {
            // Closing the writer writes the stream's last block.
            self.writer.take().map_or_else(Vec::new, |w| w.into_inner())
        } else {
            std::mem::take(writer.get_mut())
        };
        self.total_out += out.len();
        self.duration += start.elapsed();
        Ok(out.into())
    }

    fn stat(&self) -> (&'static str, usize, usize, std::time::Duration) {
        ("brotli", self.total_in, self.total_out, self.duration)
    }
}

impl Compress {
    pub fn new(c: &CompressConfig, route: &str, metrics: &Metrics) -> Compress {
        let mut exact = Vec::new();
        let mut prefixes = Vec::new();
        let mut suffixed = Vec::new();
        for t in &c.types {
            if let Some(prefix) = t.strip_suffix('*') {
                prefixes.push(prefix.to_string());
            } else if let Some((before, after)) = t.split_once("/*") {
                suffixed.push((format!("{before}/"), after.to_string()));
            } else {
                exact.push(t.clone());
            }
        }
        Compress {
            algorithms: c.algorithms.clone(),
            min_size: c.min_size,
            exact,
            prefixes,
            suffixed,
            compressed: Coding::ALL.map(|coding| {
                metrics
                    .compressed_responses
                    .with_label_values(&[route, coding.token()])
            }),
        }
    }

    /// The coding `req` gets: the first of the route's algorithms its `Accept-Encoding`
    /// accepts (a q-value above 0, by name or by `*`); `None`: identity.
    pub fn negotiate(&self, req: &RequestHeader) -> Option<Coding> {
        let offered = accepted(req);
        self.algorithms.iter().copied().find(|c| {
            let named = offered.iter().find(|(name, _)| name == c.token());
            match named {
                Some((_, q)) => *q > 0.0,
                None => offered.iter().any(|(name, q)| name == "*" && *q > 0.0),
            }
        })
    }

    fn type_matches(&self, resp: &ResponseHeader) -> bool {
        let Some(ct) = resp
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        self.exact.contains(&media)
            || self.prefixes.iter().any(|p| media.starts_with(p.as_str()))
            || self
                .suffixed
                .iter()
                .any(|(p, s)| media.starts_with(p.as_str()) && media.ends_with(s.as_str()))
    }

    /// Whether the answer is one the route compresses, for some client.
    fn compressible(&self, req: &RequestHeader, resp: &ResponseHeader) -> bool {
        let status = resp.status.as_u16();
        if req.method == http::Method::HEAD
            || req.headers.contains_key(header::RANGE)
            || status < 200
            || matches!(status, 204 | 206 | 304)
        {
            return false;
        }
        let encoded = resp
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        let no_transform =
            crate::http::headers::list_has(&resp.headers, header::CACHE_CONTROL, "no-transform");
        let short = resp
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n < self.min_size);
        !encoded && !no_transform && !short && self.type_matches(resp)
    }

    /// Decides for one answer, and shapes its header: the encoder to feed its body to,
    /// when it is to be compressed.
    pub fn start(&self, req: &RequestHeader, resp: &mut ResponseHeader) -> Option<Encoder> {
        if !self.compressible(req, resp) {
            return None;
        }
        crate::http::headers::add_vary(resp, "Accept-Encoding");
        let coding = self.negotiate(req)?;
        let encoder = encoder(coding)?;
        let _ = resp.insert_header(header::CONTENT_ENCODING, coding.token());
        resp.remove_header(&header::CONTENT_LENGTH);
        resp.remove_header(&header::ACCEPT_RANGES);
        let _ = resp.insert_header(header::TRANSFER_ENCODING, "chunked");
        weaken_etag(resp);
        if let Some(i) = Coding::ALL.iter().position(|c| *c == coding) {
            self.compressed[i].inc();
        }
        Some(Encoder(encoder))
    }
}

/// The codings a request's `Accept-Encoding` names, with their q-values (1 when absent).
fn accepted(req: &RequestHeader) -> Vec<(String, f32)> {
    crate::http::headers::list(&req.headers, header::ACCEPT_ENCODING)
        .filter_map(|item| {
            let mut parts = item.split(';');
            let name = parts.next()?.trim().to_ascii_lowercase();
            if name.is_empty() {
                return None;
            }
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            Some((name, q))
        })
        .collect()
}

/// A strong `ETag` becomes weak (the bytes changed, the representation did not); one that
/// is not a valid tag goes.
fn weaken_etag(resp: &mut ResponseHeader) {
    let Some(etag) = resp.headers.get(header::ETAG) else {
        return;
    };
    let bytes = etag.as_bytes();
    if bytes.starts_with(b"W/") {
        return;
    }
    if bytes.starts_with(b"\"") {
        if let Ok(weak) = HeaderValue::from_bytes(&[b"W/", bytes].concat()) {
            let _ = resp.insert_header(header::ETAG, weak);
            return;
        }
    }
    resp.remove_header(&header::ETAG);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress(types: &[&str], algorithms: &[Coding]) -> Compress {
        let metrics = Metrics::new().unwrap();
        Compress::new(
            &CompressConfig {
                algorithms: algorithms.to_vec(),
                min_size: 100,
                types: types.iter().map(|t| t.to_string()).collect(),
            },
            "r",
            &metrics,
        )
    }

    fn req(ae: &str) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        if !ae.is_empty() {
            r.insert_header("accept-encoding", ae).unwrap();
        }
        r
    }

    #[test]
    fn the_first_accepted_coding_of_the_route_wins() {
        let c = compress(&["text/*"], &Coding::ALL);
        assert_eq!(c.negotiate(&req("gzip, br")), Some(Coding::Br));
        assert_eq!(
            c.negotiate(&req("gzip;q=0.5, zstd;q=0")),
            Some(Coding::Gzip)
        );
        assert_eq!(c.negotiate(&req("*")), Some(Coding::Zstd));
        assert_eq!(c.negotiate(&req("*;q=0.1, zstd;q=0")), Some(Coding::Br));
        assert_eq!(c.negotiate(&req("identity")), None);
        assert_eq!(c.negotiate(&req("gzip;q=0")), None);
        assert_eq!(c.negotiate(&req("")), None);
        let gzip_only = compress(&["text/*"], &[Coding::Gzip]);
        assert_eq!(gzip_only.negotiate(&req("br, zstd")), None);
    }

    #[test]
    fn only_what_qualifies_is_compressed() {
        let c = compress(
            &["text/*", "application/json", "application/*+json"],
            &Coding::ALL,
        );
        let resp = |headers: &[(&str, &str)], status: u16| {
            let mut r = ResponseHeader::build(status, None).unwrap();
            for (k, v) in headers {
                r.insert_header(k.to_string(), *v).unwrap();
            }
            r
        };
        let json = [
            ("content-type", "application/json; charset=utf-8"),
            ("content-length", "500"),
        ];
        let mut r = resp(&json, 200);
        r.insert_header("etag", "\"abc\"").unwrap();
        assert!(c.start(&req("gzip"), &mut r).is_some());
        assert_eq!(r.headers["content-encoding"], "gzip");
        assert_eq!(r.headers["etag"], "W/\"abc\"");
        assert_eq!(r.headers["vary"], "Accept-Encoding");
        assert!(r.headers.get("content-length").is_none());
        let mut r = resp(&[("content-type", "application/problem+json")], 404);
        assert!(
            c.start(&req("gzip"), &mut r).is_some(),
            "unknown length, suffixed type"
        );
        for (headers, status) in [
            (
                vec![("content-type", "image/png"), ("content-length", "500")],
                200,
            ),
            (
                vec![("content-type", "text/html"), ("content-length", "50")],
                200,
            ),
            (
                vec![("content-type", "text/html"), ("content-encoding", "br")],
                200,
            ),
            (
                vec![
                    ("content-type", "text/html"),
                    ("cache-control", "public, no-transform"),
                ],
                200,
            ),
            (vec![("content-type", "text/html")], 206),
            (vec![("content-type", "text/html")], 204),
        ] {
            let mut r = resp(&headers, status);
            assert!(
                c.start(&req("gzip"), &mut r).is_none(),
                "{headers:?} {status}"
            );
        }
        // Compressible, but the client takes none: identity, and Vary says why.
        let mut r = resp(&json, 200);
        assert!(c.start(&req(""), &mut r).is_none());
        assert_eq!(r.headers["vary"], "Accept-Encoding");
        let mut head = req("gzip");
        head.set_method(http::Method::HEAD);
        assert!(c.start(&head, &mut resp(&json, 200)).is_none());
    }
}
