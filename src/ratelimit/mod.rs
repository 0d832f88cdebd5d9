//! Rate limits (`rate_limit:` on a route): `requests_per_second` with a `burst`, per key
//! (`client_ip`, `global` or `header:NAME`).
//!
//! The algorithm is GCRA, the token bucket kept as one "theoretical arrival time" per key:
//! a request is allowed if, after adding one emission interval (1 / rate), that time is no
//! more than `burst` intervals ahead of now. pingora-limits' `Rate` is a sliding-window
//! estimator of the observed rate, which cannot express a burst allowance, so it is not
//! used here.
//!
//! Keys live in sharded maps (key hash → arrival time) capped in size: a key whose bucket
//! is full again needs no state and is the first to go, so a million distinct clients cost
//! a bounded table, not a million entries. Only when more keys than the cap are active at
//! once is an active key forgotten (it then gets a fresh burst). The `global` key is one
//! arrival time in one atomic, moved by compare-and-swap: every request of the route
//! shares it, so no lock may stand there.
//!
//! With `store: redis` the arrival times live in Redis instead, shared by every instance
//! ([`shared`]): the same GCRA, run there by one script per decision, or per lease of
//! `lease` tokens that the instance then spends locally.
//!
//! [`step::Limit`] is how a route uses its limiter: the last step of the route's chain,
//! with the 429 on the request side and the `X-RateLimit-*` headers on the answer side.

pub mod shared;
pub(crate) mod step;

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::{KeySource, LimitStore, RateLimitConfig};
use crate::keys;
pub use shared::{SharedLimit, SharedStore};

const SHARDS: usize = 64;
/// Keys remembered per shard (64 × 16,384 ≈ one million at most per route).
const SHARD_CAP: usize = 16_384;
/// One emission interval at the slowest rate, in nanoseconds.
const MAX_INTERVAL_NS: f64 = 86_400.0 * 1e9;

pub struct RateLimiter {
    pub key: KeySource,
    /// The configured rate, for `X-RateLimit-Limit`.
    pub limit: f64,
    interval_ns: u64,
    tolerance_ns: u64,
    arrivals: Arrivals,
    epoch: Instant,
}

/// Where the arrival times live.
enum Arrivals {
    /// The `global` key's, in one atomic.
    Global(AtomicU64),
    /// Per key hash, in sharded maps.
    PerKey(Vec<Mutex<HashMap<u64, u64>>>),
    /// In Redis (`store: redis`): decided there, asynchronously.
    Shared(SharedLimit),
}

/// How a request's decision is had.
pub enum Check<'a> {
    /// Decided here and now.
    Now(Decision),
    /// To be asked of the shared store ([`SharedLimit::check`]).
    Ask(&'a SharedLimit),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow {
        remaining: u64,
    },
    /// Refused; a token is free again after this many seconds (at least 1).
    Deny {
        retry_after_secs: u64,
    },
}

impl RateLimiter {
    /// A route's limiter; `label` names the route in the shared store's keys, `store` is
    /// the shared store when the configuration has `redis:`.
    pub fn new(
        config: &RateLimitConfig,
        label: &str,
        store: Option<&Arc<SharedStore>>,
    ) -> RateLimiter {
        // Validation keeps the rate at or above `config::MIN_REQUESTS_PER_SECOND`; the clamp and the
        // saturating arithmetic below keep any other value from overflowing all the same.
        let interval_ns = (1e9 / config.requests_per_second).clamp(1.0, MAX_INTERVAL_NS) as u64;
        let tolerance_ns = interval_ns.saturating_mul(config.burst as u64);
        let arrivals = match (config.store, store, &config.key) {
            // Validation refuses `store: redis` without `redis:`; were it missing all the
            // same, the limit would hold per instance rather than not at all.
            (LimitStore::Redis, Some(store), _) => Arrivals::Shared(SharedLimit::new(
                Arc::clone(store),
                label,
                interval_ns,
                tolerance_ns,
                config.on_store_error,
                config.lease,
            )),
            (_, _, KeySource::Global) => Arrivals::Global(AtomicU64::new(0)),
            _ => Arrivals::PerKey((0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect()),
        };
        RateLimiter {
            key: config.key.clone(),
            limit: config.requests_per_second,
            interval_ns,
            tolerance_ns,
            arrivals,
            epoch: Instant::now(),
        }
    }

    /// GCRA for one key whose arrival time is `tat`: the new arrival time if a token is
    /// free at `now_ns`, else the refusal.
    fn take(&self, tat: u64, now_ns: u64) -> Result<(u64, Decision), Decision> {
        let next = tat.max(now_ns).saturating_add(self.interval_ns);
        let ahead = next - now_ns;
        if ahead > self.tolerance_ns {
            let wait_ns = ahead - self.tolerance_ns;
            return Err(Decision::Deny {
                retry_after_secs: wait_ns.div_ceil(1_000_000_000).max(1),
            });
        }
        let remaining = (self.tolerance_ns - ahead) / self.interval_ns;
        Ok((next, Decision::Allow { remaining }))
    }

    /// Takes one token for `key` at `now` if there is one, or says to ask the shared store.
    pub fn decide(&self, key: &[u8], now: Instant) -> Check<'_> {
        match &self.arrivals {
            Arrivals::Shared(shared) => match shared.local(key, now) {
                Some(decision) => Check::Now(decision),
                None => Check::Ask(shared),
            },
            _ => Check::Now(self.check(key, now)),
        }
    }

    /// Takes one token for `key` at `now`, if there is one, from the buckets of this process
    /// (a shared limiter's are in Redis: [`Self::decide`] says so; here it allows).
    fn check(&self, key: &[u8], now: Instant) -> Decision {
        let hash = keys::stable_hash(key);
        // Time runs from `epoch` shifted by the tolerance, so arithmetic never goes below 0.
        let since_epoch = now.saturating_duration_since(self.epoch).as_nanos();
        let now_ns = u64::try_from(since_epoch)
            .unwrap_or(u64::MAX)
            .saturating_add(self.tolerance_ns);
        let shards = match &self.arrivals {
            Arrivals::PerKey(shards) => shards,
            Arrivals::Shared(_) => return Decision::Allow { remaining: 0 },
            Arrivals::Global(tat_now) => {
                let mut tat = tat_now.load(Ordering::Relaxed);
                loop {
                    let (next, allow) = match self.take(tat, now_ns) {
                        Ok(taken) => taken,
                        Err(deny) => return deny,
                    };
                    let swapped = tat_now.compare_exchange_weak(
                        tat,
                        next,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    match swapped {
                        Ok(_) => return allow,
                        Err(moved) => tat = moved,
                    }
                }
            }
        };
        let shard = &shards[(hash as usize) % shards.len()];
        let mut map = shard.lock();
        let tat = map.get(&hash).copied().unwrap_or(0);
        let (next, allow) = match self.take(tat, now_ns) {
            Ok(taken) => taken,
            Err(deny) => return deny,
        };
        if map.len() >= SHARD_CAP && !map.contains_key(&hash) {
            make_room(&mut map, now_ns);
        }
        map.insert(hash, next);
        allow
    }

    /// Keys currently remembered (for tests and the memory figure).
    pub fn tracked_keys(&self) -> usize {
        match &self.arrivals {
            Arrivals::Global(_) | Arrivals::Shared(_) => 0,
            Arrivals::PerKey(shards) => shards.iter().map(|s| s.lock().len()).sum(),
        }
    }
}

/// Frees room in a full shard: first every key whose bucket is full again (arrival time
/// passed), then, if all are active, an eighth of them.
fn make_room(map: &mut HashMap<u64, u64>, now_ns: u64) {
    map.retain(|_, tat| *tat > now_ns);
    if map.len() >= SHARD_CAP {
        let drop: Vec<u64> = map.keys().take(SHARD_CAP / 8).copied().collect();
        for k in drop {
            map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MIN_REQUESTS_PER_SECOND;
    use std::time::Duration;

    fn limiter(rps: f64, burst: u32, key: KeySource) -> RateLimiter {
        let config = RateLimitConfig {
            requests_per_second: rps,
            burst,
            key,
            store: LimitStore::Local,
            on_store_error: crate::config::OnStoreError::Allow,
            lease: 0,
        };
        RateLimiter::new(&config, "test", None)
    }

    #[test]
    fn burst_then_rate() {
        let l = limiter(10.0, 5, KeySource::ClientIp);
        let t = Instant::now();
        for i in 0..5 {
            assert_eq!(l.check(b"a", t), Decision::Allow { remaining: 4 - i });
        }
        assert_eq!(
            l.check(b"a", t),
            Decision::Deny {
                retry_after_secs: 1
            }
        );
        // Another key has its own bucket.
        assert!(matches!(l.check(b"b", t), Decision::Allow { .. }));
        // One interval later, one more token.
        let t1 = t + Duration::from_millis(100);
        assert!(matches!(
            l.check(b"a", t1),
            Decision::Allow { remaining: 0 }
        ));
        assert!(matches!(l.check(b"a", t1), Decision::Deny { .. }));
        // Over 10 s at most burst + 10/s × 10 s are allowed.
        let allowed = (0..10_000)
            .filter(|i| {
                matches!(
                    l.check(b"c", t + Duration::from_millis(*i)),
                    Decision::Allow { .. }
                )
            })
            .count();
        assert_eq!(allowed, 5 + 100 - 1);
    }

    #[test]
    fn the_global_key_allows_its_burst_once_across_threads() {
        let l = limiter(1.0, 1000, KeySource::Global);
        let t = Instant::now();
        let allowed: usize = std::thread::scope(|s| {
            let counts: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000)
                            .filter(|_| matches!(l.check(b"", t), Decision::Allow { .. }))
                            .count()
                    })
                })
                .collect();
            counts.into_iter().map(|c| c.join().unwrap()).sum()
        });
        assert_eq!(allowed, 1000);
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn extreme_rates_neither_overflow_nor_panic() {
        let t = Instant::now();
        for rps in [
            MIN_REQUESTS_PER_SECOND,
            1e-300,
            f64::MIN_POSITIVE,
            1e12,
            1e300,
        ] {
            let l = limiter(rps, u32::MAX, KeySource::Global);
            for i in 0..3 {
                l.check(b"", t + Duration::from_secs(i));
            }
        }
        let slow = limiter(MIN_REQUESTS_PER_SECOND, 1, KeySource::Global);
        assert!(matches!(slow.check(b"", t), Decision::Allow { .. }));
        assert_eq!(
            slow.check(b"", t),
            Decision::Deny {
                retry_after_secs: 86_400
            }
        );
    }

    #[test]
    fn retry_after_counts_whole_seconds_until_a_token() {
        let l = limiter(0.25, 1, KeySource::Global);
        let t = Instant::now();
        assert!(matches!(l.check(b"", t), Decision::Allow { .. }));
        assert_eq!(
            l.check(b"", t),
            Decision::Deny {
                retry_after_secs: 4
            }
        );
    }

    #[test]
    fn memory_stays_bounded_under_many_keys() {
        let l = limiter(1.0, 1, KeySource::ClientIp);
        let t = Instant::now();
        for i in 0..1_200_000u32 {
            l.check(&i.to_be_bytes(), t + Duration::from_micros(i as u64));
        }
        assert!(
            l.tracked_keys() <= SHARDS * SHARD_CAP,
            "{}",
            l.tracked_keys()
        );
    }
}
