//! `auth:`: the credential a route asks for, one kind per route, each a [`RequestFilter`]:
//! [`basic::Basic`] (htpasswd, bcrypt), [`api_key::ApiKeys`] (a header or a query
//! parameter, keys from a file), [`jwt::Jwt`] (a JWKS file or URL, or an HMAC secret) and
//! [`forward::Forward`] (an auth service is asked). A request that passes gets the
//! identity it proved (user, key name, `sub`) on its [`Client`](crate::http::client::Client):
//! the access log's `identity`, and `rate_limit.key: identity`. Credentials themselves are
//! never logged, and mirrors lose them with their `redact_headers`.
//!
//! Expensive checks are remembered per credential ([`Remembered`], bounded, keyed by the
//! credential's SHA-256, never the credential itself): a bcrypt verification, a token's
//! signature check, a forward-auth decision.

pub mod api_key;
pub mod basic;
pub mod forward;
pub mod jwt;

use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::{Build, RequestFilter};
use crate::config::AuthConfig;
use crate::http::answer::{Reason, Stop};

/// The filter for a route's `auth:`.
pub fn build(config: &AuthConfig, with: &Build) -> Box<dyn RequestFilter> {
    match config {
        AuthConfig::Basic(c) => Box::new(basic::Basic::new(c)),
        AuthConfig::ApiKey(c) => Box::new(api_key::ApiKeys::new(c)),
        AuthConfig::Jwt(c) => Box::new(jwt::Jwt::new(c, with)),
        AuthConfig::Forward(c) => Box::new(forward::Forward::new(c, with)),
    }
}

/// A credential's digest: what caches are keyed by.
pub type Digest = [u8; 32];

/// SHA-256 of the parts, each preceded by its length (so `("ab", "c")` and `("a", "bc")`
/// differ).
pub fn digest(parts: &[&[u8]]) -> Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_le_bytes());
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Decisions remembered per credential for `ttl` (or less, per entry), at most `max` of
/// them: a moka cache, whose TinyLFU admission keeps the credentials that come back and
/// evicts the rest, so memory stays bounded whatever clients send.
pub struct Remembered<V> {
    entries: moka::sync::Cache<Digest, (V, Duration)>,
    ttl: Duration,
}

/// Each entry lives for the lifetime it was put with.
struct OwnLifetime;

impl<V> moka::Expiry<Digest, (V, Duration)> for OwnLifetime {
    fn expire_after_create(
        &self,
        _key: &Digest,
        value: &(V, Duration),
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.1)
    }

    fn expire_after_update(
        &self,
        _key: &Digest,
        value: &(V, Duration),
        _now: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.1)
    }
}

impl<V: Clone + Send + Sync + 'static> Remembered<V> {
    pub fn new(max: usize, ttl: Duration) -> Remembered<V> {
        Remembered {
            entries: moka::sync::Cache::builder()
                .max_capacity(max.max(1) as u64)
                .expire_after(OwnLifetime)
                .build(),
            ttl,
        }
    }

    pub fn get(&self, key: &Digest) -> Option<V> {
        if self.ttl.is_zero() {
            return None;
        }
        self.entries.get(key).map(|(v, _)| v)
    }

    pub fn put(&self, key: Digest, value: V) {
        self.put_for(key, value, self.ttl);
    }

    /// Remembers `value` for `ttl` at most (a token's own lifetime may be shorter).
    pub fn put_for(&self, key: Digest, value: V, ttl: Duration) {
        let ttl = ttl.min(self.ttl);
        if !ttl.is_zero() {
            self.entries.insert(key, (value, ttl));
        }
    }

    /// How many it holds (after the cache's pending evictions ran).
    pub fn len(&self) -> usize {
        self.entries.run_pending_tasks();
        usize::try_from(self.entries.entry_count()).unwrap_or(usize::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Entries each credential cache holds at most.
pub const REMEMBERED: usize = 10_000;

/// The credential after `scheme ` in `Authorization` (the scheme's case ignored).
pub fn authorization<'a>(req: &'a pingora_http::RequestHeader, scheme: &str) -> Option<&'a str> {
    let value = req
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (given, rest) = value.split_once(' ')?;
    given
        .eq_ignore_ascii_case(scheme)
        .then(|| rest.trim())
        .filter(|c| !c.is_empty())
}

/// A 401 for `reason`, asking for `challenge` (`WWW-Authenticate`).
pub fn unauthorized(reason: Reason, challenge: HeaderValue) -> Stop {
    Stop::denied(401, reason, "unauthorized").with_header(http::header::WWW_AUTHENTICATE, challenge)
}

/// The identity of a credential that names none: a short digest, never the secret.
pub fn anonymous(kind: &str, d: &Digest) -> String {
    let hex: String = d[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{kind}:{hex}")
}

/// Sets `name: value` on the request, dropping whatever the client sent under that name.
pub fn set_request_header(
    req: &mut pingora_http::RequestHeader,
    name: &HeaderName,
    value: Option<HeaderValue>,
) {
    req.remove_header(name);
    if let Some(v) = value {
        let _ = req.insert_header(name.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_is_bounded_and_forgets_on_time() {
        let r: Remembered<u32> = Remembered::new(16, Duration::from_secs(60));
        for i in 0..100u32 {
            r.put(digest(&[&i.to_le_bytes()]), i);
            assert!(r.len() <= 16);
        }
        let k = digest(&[b"k"]);
        r.put(k, 7);
        assert_eq!(r.get(&k), Some(7));
        r.put_for(k, 8, Duration::ZERO);
        assert_eq!(r.get(&k), Some(7), "a zero lifetime is not remembered");
        let never: Remembered<u32> = Remembered::new(16, Duration::ZERO);
        never.put(k, 1);
        assert_eq!(never.get(&k), None);
        assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]));
    }
}
