//! W3C Trace Context (`traceparent`, `tracestate`): every request carries one to its
//! upstream, its mirror and fallback copies and its broadcast deliveries, so that logs and
//! traces correlate across the gateway even with `tracing:` off.
//!
//! A valid `traceparent` from the client goes on unchanged (with its `tracestate`), as a
//! proxy that records no span of its own should pass it. A missing or invalid one is
//! replaced by a new one (a fresh trace id and parent id, not sampled), and an orphaned
//! `tracestate` is dropped with it. The trace id is in the access log (`trace_id`).

use http::HeaderValue;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A request's trace context, as received or as created for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// A request's trace context and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    pub parent: TraceParent,
    pub origin: Origin,
    /// With `tracing:`, the span of the sampled request that this context is passed on
    /// under: what the request sends names it (or a span under it) as its parent.
    pub span: Option<[u8; 8]>,
}

impl Default for Trace {
    /// A new trace (until the request's own headers are read).
    fn default() -> Self {
        Trace {
            parent: TraceParent::new_root(),
            origin: Origin::Created,
            span: None,
        }
    }
}

impl Trace {
    /// The request's context: the client's valid one, else a new one.
    pub fn of(headers: &http::HeaderMap) -> Trace {
        let mut sent = headers.get_all(TRACEPARENT).iter();
        // Exactly one traceparent field; more than one is invalid.
        let client = match (sent.next(), sent.next()) {
            (Some(v), None) => TraceParent::parse(v.as_bytes()),
            _ => None,
        };
        match client {
            Some(parent) => Trace {
                parent,
                origin: Origin::Client,
                span: None,
            },
            None => Trace {
                parent: TraceParent::new_root(),
                origin: Origin::Created,
                span: None,
            },
        }
    }

    /// Makes `req` carry this context: under the request's span when it is traced; else a
    /// created one replaces whatever `traceparent` and `tracestate` it had, and the
    /// client's own is already there.
    pub fn propagate(&self, req: &mut pingora_http::RequestHeader) -> pingora_error::Result<()> {
        match self.span {
            Some(span) => self.propagate_under(req, span),
            None if self.origin == Origin::Created => {
                req.remove_header(TRACESTATE);
                req.insert_header(TRACEPARENT, self.parent.header_value())
            }
            None => Ok(()),
        }
    }

    /// Makes `req` carry this trace with `span` (a span of the gateway's) as its parent.
    pub fn propagate_under(
        &self,
        req: &mut pingora_http::RequestHeader,
        span: [u8; 8],
    ) -> pingora_error::Result<()> {
        if self.origin == Origin::Created {
            req.remove_header(TRACESTATE);
        }
        let hop = TraceParent {
            trace_id: self.parent.trace_id,
            parent_id: span,
            flags: self.parent.flags | 1,
        };
        req.insert_header(TRACEPARENT, hop.header_value())
    }
}

/// What the gateway does with a request's `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client sent a valid one: it goes on as it is.
    Client,
    /// None, or an invalid one: this one replaces it.
    Created,
}

impl TraceParent {
    /// Parses a `traceparent` value (version 00, or a later version's first four fields).
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let version = hex_byte(value.get(0..2)?)?;
        // Version ff is invalid; 00 is exactly 55 bytes; a later version may add fields
        // after a dash (W3C Trace Context, 4.3).
        let fits = match version {
            0xff => false,
            0x00 => value.len() == 55,
            _ => value.len() == 55 || (value.len() > 55 && value[55] == b'-'),
        };
        if !fits || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        for (i, b) in parent_id.iter_mut().enumerate() {
            *b = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// A new trace, not sampled.
    pub fn new_root() -> TraceParent {
        let (a, b, c) = (
            crate::http::request_id::random_u64(),
            crate::http::request_id::random_u64(),
            crate::http::request_id::random_u64(),
        );
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&a.to_be_bytes());
        trace_id[8..].copy_from_slice(&b.to_be_bytes());
        TraceParent {
            trace_id,
            parent_id: c.max(1).to_be_bytes(),
            flags: 0,
        }
    }

    /// The trace id as 32 lower-case hex digits (the access log's `trace_id`).
    pub fn trace_id_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, &self.trace_id);
        s
    }

    /// The `traceparent` value (version 00).
    pub fn header_value(&self) -> HeaderValue {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id);
        s.push('-');
        push_hex(&mut s, &self.parent_id);
        s.push('-');
        push_hex(&mut s, &[self.flags]);
        HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None, // upper case is invalid in traceparent
    };
    match two {
        [h, l] => Some(digit(*h)? << 4 | digit(*l)?),
        _ => None,
    }
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_writes_the_w3c_example() {
        let t = TraceParent::parse(GOOD).expect("valid");
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.flags, 1);
        assert_eq!(t.header_value().as_bytes(), GOOD);
    }

    #[test]
    fn refuses_what_the_spec_calls_invalid() {
        for bad in [
            &b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            b"garbage",
        ] {
            assert!(
                TraceParent::parse(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A later version may carry more fields.
        assert!(TraceParent::parse(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next"
        )
        .is_some());
    }

    #[test]
    fn a_missing_or_doubled_header_makes_a_new_trace() {
        let mut h = http::HeaderMap::new();
        let a = Trace::of(&h);
        assert_eq!(a.origin, Origin::Created);
        assert_ne!(a.parent.trace_id, [0; 16]);
        assert_ne!(a.parent, Trace::of(&h).parent);
        let good =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        h.append(TRACEPARENT, good.clone());
        assert_eq!(Trace::of(&h).origin, Origin::Client);
        h.append(TRACEPARENT, good);
        assert_eq!(Trace::of(&h).origin, Origin::Created);
        let made = TraceParent::new_root();
        assert_eq!(
            TraceParent::parse(made.header_value().as_bytes()),
            Some(made)
        );
    }
}
