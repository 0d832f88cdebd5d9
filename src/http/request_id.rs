//! `X-Request-Id`: kept when the client sent a sane one, generated otherwise. Generated ids
//! are 32 hex digits: a per-process random seed mixed with a counter, so they are unique
//! within the process, unlikely to collide across processes, and cost no system call.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

pub const HEADER: &str = "x-request-id";
/// Longest client-sent id that is kept.
pub const MAX_LEN: usize = 128;

static SEED: OnceLock<u64> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn seed() -> u64 {
    *SEED.get_or_init(|| {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        h.finish()
    })
}

/// splitmix64's finaliser: a bijection, so distinct counters give distinct ids.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// A number in [0, 1), for jitter: a fresh mix of the seed and the counter.
pub fn unit_random() -> f64 {
    let n = COUNTER.fetch_add(1, Relaxed);
    (mix(n ^ seed().rotate_left(29)) >> 11) as f64 / (1u64 << 53) as f64
}

/// 64 random-looking bits (trace and span ids): distinct within the process.
pub fn random_u64() -> u64 {
    let n = COUNTER.fetch_add(1, Relaxed);
    mix(n ^ seed().rotate_left(41))
}

/// A new request id.
pub fn generate() -> String {
    let n = COUNTER.fetch_add(1, Relaxed);
    let s = seed();
    format!("{:016x}{:016x}", s, mix(n ^ s.rotate_left(17)))
}

/// Whether a client-sent id may be kept: 1 to 128 visible ASCII characters.
pub fn is_valid(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_LEN && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// The client's id if valid, else a new one.
pub fn from_client(sent: Option<&[u8]>) -> String {
    match sent {
        Some(id) if is_valid(id) => String::from_utf8_lossy(id).into_owned(),
        _ => generate(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_ids_and_replaces_others() {
        assert_eq!(from_client(Some(b"abc-123")), "abc-123");
        assert_ne!(from_client(Some(b"has space")), "has space");
        assert_eq!(from_client(Some(&[b'a'; 129])).len(), 32);
        assert_eq!(from_client(None).len(), 32);
        assert_ne!(generate(), generate());
    }
}
