//! Per-request keys and the hashing and sampling built on them. A [`KeySource`] from the
//! configuration (`client_ip`, `path`, `header:NAME`, `cookie:NAME`, `query:NAME`,
//! `identity`, `random`, `global`) names where a key comes
//! from; [`key_bytes`] reads it from a request and its [`Client`] without allocating.
//! Consistent hashing, mirror sampling (`sample_by`), rate limits and traffic splits all
//! key requests this way; [`bucket`] is a split's side as a pure function of the key.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;

use pingora_http::RequestHeader;

use crate::config::KeySource;
use crate::http::client::Client;
use crate::http::headers::{cookie, query_raw};

/// The bytes of a request's key; `buf` holds a client IP's bytes. A missing header gives
/// the empty key, so such requests are all treated alike. `identity` falls back to the
/// client's address when no `auth` named one.
pub fn key_bytes<'a>(
    req: &'a RequestHeader,
    client: &'a Client,
    key: &KeySource,
    buf: &'a mut [u8; 16],
) -> &'a [u8] {
    let ip = |buf: &'a mut [u8; 16]| -> &'a [u8] {
        match client.ip {
            Some(IpAddr::V4(ip)) => {
                buf[..4].copy_from_slice(&ip.octets());
                &buf[..4]
            }
            Some(IpAddr::V6(ip)) => {
                buf.copy_from_slice(&ip.octets());
                &buf[..]
            }
            None => b"",
        }
    };
    match key {
        KeySource::ClientIp => ip(buf),
        KeySource::Identity => match &client.identity {
            Some(id) => id.as_bytes(),
            None => ip(buf),
        },
        KeySource::Path => req.uri.path().as_bytes(),
        KeySource::Header(name) => req.headers.get(name).map_or(b"", |v| v.as_bytes()),
        KeySource::Cookie(name) => cookie(&req.headers, name).unwrap_or(b""),
        KeySource::Query(name) => query_raw(req.uri.query(), name).map_or(b"", str::as_bytes),
        KeySource::Random => {
            buf[..8].copy_from_slice(&random_u64().to_le_bytes());
            &buf[..8]
        }
        KeySource::Global => b"",
    }
}

/// A hash of `bytes` that is the same in every process and every run (FNV-1a, then
/// splitmix64's finaliser to spread FNV's weak high bits), so a key sampled today is
/// sampled after a restart too.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d049bb133111eb);
    h ^ (h >> 31)
}

pub use crate::config::BUCKETS;

/// The bucket (0..[`BUCKETS`]) of a key: the same in every process, so every instance of a
/// fleet puts a user on the same side.
pub fn bucket(key: &[u8]) -> u32 {
    (stable_hash(key) % u64::from(BUCKETS)) as u32
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(RandomState::new().build_hasher().finish() | 1);
}

/// A fast per-thread pseudo-random number (xorshift64*), for sampling only.
pub fn random_u64() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545f4914f6cdd1d)
    })
}

/// Whether a draw `x` (uniform over u64) falls within `percent` (0..=100, fractions allowed).
pub fn within_percent(x: u64, percent: f64) -> bool {
    if percent >= 100.0 {
        return true;
    }
    if percent <= 0.0 {
        return false;
    }
    (x as f64) < percent / 100.0 * (u64::MAX as f64)
}

/// The request's host: its `Host` header, else the target's authority.
pub fn request_host(req: &pingora_http::RequestHeader) -> Option<&str> {
    req.headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.host())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_stable_and_spread() {
        assert_eq!(stable_hash(b"user-1"), stable_hash(b"user-1"));
        assert_ne!(stable_hash(b"user-1"), stable_hash(b"user-2"));
        let hits = (0..10_000)
            .filter(|i| within_percent(stable_hash(format!("k{i}").as_bytes()), 30.0))
            .count();
        assert!((2700..3300).contains(&hits), "{hits}");
    }

    #[test]
    fn random_sampling_follows_the_percentage() {
        let hits = (0..100_000)
            .filter(|_| within_percent(random_u64(), 12.5))
            .count();
        assert!((11_500..13_500).contains(&hits), "{hits}");
        assert!(within_percent(random_u64(), 100.0));
        assert!(!within_percent(0, 0.0));
    }
}
