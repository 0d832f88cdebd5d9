//! What a request must respect before it goes on: its `Expect` (only `100-continue`), and
//! the route's `max_body_bytes`, checked on the
//! declared length before anything goes upstream and counted piece by piece while a body
//! streams, without ever buffering it. (Framing itself is held to RFC 9112 before a request
//! reaches the proxy at all: [`crate::edge::framing`].)

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use pingora_http::RequestHeader;

/// A bound on something counted (bytes a queue holds, copies in flight, open
/// connections): a unit is taken before use and given back after. Taking never waits: over
/// the bound it fails. Every counting limit of the gateway is one: the access log's and the
/// broadcast deliveries' bytes, a mirror's and a fallback route's copies in flight, the
/// client connections. The bound may change while units are held (a reload): what is held
/// stays held, and new takes see the new bound.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: AtomicUsize,
}

impl Budget {
    pub const fn new(max: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    /// Takes `n` units, or nothing if that would go over the bound.
    pub fn try_take(&self, n: usize) -> bool {
        let before = self.used.fetch_add(n, Relaxed);
        if before.saturating_add(n) > self.max.load(Relaxed) {
            self.used.fetch_sub(n, Relaxed);
            return false;
        }
        true
    }

    pub fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Relaxed);
    }

    /// Units held now.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// Applies a new bound to takes from now on.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Relaxed);
    }

    /// `n` units held until the [`Held`] is dropped.
    pub fn hold(self: &Arc<Self>, n: usize) -> Option<Held> {
        self.try_take(n).then(|| Held {
            budget: Arc::clone(self),
            n,
        })
    }

    /// `n` units, each held on its own (one per copy, say): all of them or none.
    pub fn hold_each(self: &Arc<Self>, n: usize) -> Option<Vec<Held>> {
        self.try_take(n).then(|| {
            (0..n)
                .map(|_| Held {
                    budget: Arc::clone(self),
                    n: 1,
                })
                .collect()
        })
    }
}

/// Units of a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    n: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give_back(self.n);
    }
}

/// Why a request was refused before or while being proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: a path that cannot be normalised, or a Host that contradicts the target.
    BadRequest(&'static str),
    /// 413: declared or streamed body over the limit.
    TooLarge,
    /// 417: an `Expect` other than `100-continue`.
    Expectation,
    /// 400, 414 or 431: an HTTP/2 request that breaks the edge's rules
    /// ([`crate::edge::h2`]; HTTP/1.1 ones are answered before the proxy).
    Edge(crate::edge::framing::Reject),
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::TooLarge => 413,
            Refusal::Expectation => 417,
            Refusal::Edge(r) => r.status(),
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::BadRequest(why) => why,
            Refusal::TooLarge => "request body too large",
            Refusal::Expectation => "only Expect: 100-continue is supported",
            Refusal::Edge(r) => r.message(),
        }
    }
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

/// Counts a streaming body against its limit, each byte once. A retry makes Pingora feed
/// the body read so far through the body filter again (its retry buffer): `restart` marks
/// the start of an attempt, and `add` tells which leading bytes of a piece are such a
/// replay, so neither the limit nor the copies (mirror, fallback) see them twice.
#[derive(Debug, Default, Clone, Copy)]
pub struct BodyCounter {
    /// Bytes of the body received so far, over every attempt.
    seen: u64,
    /// Bytes passed through the filter in the current attempt.
    pos: u64,
}

impl BodyCounter {
    /// A new upstream attempt starts: the body filter starts again from the first byte.
    pub fn restart(&mut self) {
        self.pos = 0;
    }

    /// Adds a piece of `chunk` bytes; `Ok(n)`: its first `n` bytes were counted before
    /// (a replay), the rest are new. `Err` once the body exceeds `limit`.
    pub fn add(&mut self, chunk: usize, limit: u64) -> Result<usize, Refusal> {
        let start = self.pos;
        self.pos = self.pos.saturating_add(chunk as u64);
        let replayed = self.seen.saturating_sub(start).min(chunk as u64) as usize;
        self.seen = self.seen.max(self.pos);
        if self.seen > limit {
            Err(Refusal::TooLarge)
        } else {
            Ok(replayed)
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
    fn declared_length() {
        assert_eq!(check_length(&req(&[("content-length", "10")]), 10), Ok(()));
        assert_eq!(
            check_length(&req(&[("content-length", "11")]), 10),
            Err(Refusal::TooLarge)
        );
        assert_eq!(
            declared_body(&req(&[("transfer-encoding", "chunked")])),
            (true, None)
        );
        assert_eq!(
            declared_body(&req(&[("content-length", "0")])),
            (false, Some(0))
        );
    }

    #[test]
    fn held_units_come_back_and_a_new_bound_applies_to_new_takes() {
        let b = Arc::new(Budget::new(3));
        let two = b.hold_each(2).expect("two");
        assert!(b.hold_each(2).is_none(), "all or none");
        let one = b.hold(1).expect("the third");
        assert!(b.hold(1).is_none());
        b.set_max(1);
        assert_eq!(b.used(), 3, "what is held stays held");
        drop(two);
        assert!(b.hold(1).is_none(), "1 held, bound 1");
        drop(one);
        assert!(b.hold(1).is_some());
    }

    #[test]
    fn streamed_bodies_are_counted() {
        let mut c = BodyCounter::default();
        assert_eq!(c.add(6, 10), Ok(0));
        assert_eq!(c.add(4, 10), Ok(0));
        assert_eq!(c.add(1, 10), Err(Refusal::TooLarge));
    }

    #[test]
    fn a_byte_budget_never_goes_over_its_bound() {
        let b = Budget::new(100);
        assert!(b.try_take(60));
        assert!(!b.try_take(41));
        assert!(b.try_take(40));
        assert!(!b.try_take(1));
        assert_eq!(b.used(), 100);
        b.give_back(60);
        assert!(b.try_take(60));
        assert!(!b.try_take(usize::MAX));
    }

    #[test]
    fn a_replayed_body_is_counted_once() {
        let mut c = BodyCounter::default();
        assert_eq!(c.add(60, 100), Ok(0));
        // The retry replays the 60 bytes read so far, then more arrive.
        c.restart();
        assert_eq!(c.add(60, 100), Ok(60));
        assert_eq!(c.add(40, 100), Ok(0));
        assert_eq!(c.add(1, 100), Err(Refusal::TooLarge));
        // A replay that comes in other pieces than the first reading.
        let mut c = BodyCounter::default();
        assert_eq!(c.add(30, 100), Ok(0));
        assert_eq!(c.add(30, 100), Ok(0));
        c.restart();
        assert_eq!(c.add(50, 100), Ok(50));
        assert_eq!(c.add(20, 100), Ok(10));
        assert_eq!(c.add(30, 100), Ok(0));
    }
}

/// What a request's `Expect` asks for (RFC 9110 §10.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Nothing,
    /// `100-continue`: the client waits for a `100` before it sends the body.
    Continue,
    /// Anything else: 417.
    Unsupported,
}

pub fn expectation(req: &RequestHeader) -> Expect {
    let mut values = req.headers.get_all(http::header::EXPECT).iter().peekable();
    if values.peek().is_none() {
        return Expect::Nothing;
    }
    match values.all(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue")) {
        true => Expect::Continue,
        false => Expect::Unsupported,
    }
}
