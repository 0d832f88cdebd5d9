//! Rate limits shared by every fanout instance (`rate_limit.store: redis`): the route's
//! GCRA buckets live in Redis, one key per bucket, moved by the scripts below — read the
//! arrival time, compare, write the new one with an expiry — which Redis runs atomically,
//! so instances never race each other. The clock is Redis's (`TIME`), so the instances'
//! clocks need not agree. A key expires when its bucket would be full again: a bucket at
//! rest costs Redis nothing.
//!
//! Two modes:
//!
//! - **exact** (`lease: 0`, the default): every decision is one `EVALSHA` taking one
//!   token, so the instances together hold exactly the configured rate, whatever the
//!   balance between them; each request waits one Redis round trip.
//! - **leased** (`lease: N`): an instance takes up to N tokens of a key's bucket at once
//!   (a lease) and spends them locally, with no round trip; it asks for the next lease in
//!   the background when half of the current one is spent. Tokens not spent within
//!   [`LEASE_TTL`] are dropped (never spent late), and an instance that stops leaves its
//!   lease to expire. What this can admit beyond the exact mode over any interval is
//!   bounded: at most `min(I × N, rate × LEASE_TTL)` requests more, for I instances (the
//!   tokens that were leased before the interval began and spent in it); over the long run
//!   admission follows the bucket. When Redis has no token left, the answer says how long
//!   until one is; the instance refuses locally until enough for half a lease has
//!   accrued, so a saturated limit costs Redis about `rate / (N / 2)` calls a second.
//!
//! Every call is bounded by `redis.timeout`; a decision Redis does not give in time (down,
//! slow, unreachable) is a store error, counted, and the route's `on_store_error` says
//! whether the request goes through (`allow`) or gets 503 (`deny`). In leased mode a store
//! error only matters once the instance's lease is spent.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::Decision;
use crate::config::OnStoreError;
use crate::outbound::redis::RedisClient;
pub use crate::outbound::redis::StoreError;

/// The connections to Redis, shared by every route with `store: redis`.
pub type SharedStore = RedisClient;

/// How long leased tokens may be spent.
pub const LEASE_TTL: Duration = Duration::from_secs(1);
/// Keys with a lease remembered per route; past it expired leases are forgotten first.
const LEASE_KEYS: usize = 65_536;

/// GCRA in Redis, taking up to ARGV[3] tokens. KEYS[1]: the bucket; ARGV[1]: the emission
/// interval, ARGV[2]: the burst tolerance, both in microseconds. Returns {tokens taken,
/// tokens left} or {0, microseconds until the next token}.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local free = math.floor((tolerance + now - tat) / interval)
if free < 1 then
  return {0, tat + interval - now - tolerance}
end
local n = math.min(want, free)
local nxt = tat + n * interval
local ahead = nxt - now
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.floor(ahead / 1000) + 1)
return {n, math.floor((tolerance - ahead) / interval)}
";

/// One route's limit in the shared store.
pub struct SharedLimit {
    inner: Arc<Inner>,
    pub on_error: OnStoreError,
}

struct Inner {
    store: Arc<SharedStore>,
    script: redis::Script,
    /// `fanout:rl:<route>:`, to which the request's key is appended.
    prefix: Vec<u8>,
    interval_us: u64,
    tolerance_us: u64,
    /// `lease:`; 0: exact mode.
    lease: u32,
    /// Leased mode: each key's lease, by the key's hash.
    leases: Mutex<HashMap<u64, Lease>>,
}

/// The tokens an instance holds of one key's bucket.
#[derive(Default)]
struct Lease {
    tokens: u32,
    /// When the tokens held lapse.
    expires: Option<Instant>,
    /// Redis said the bucket is empty: no asking before this.
    empty_until: Option<Instant>,
    /// Renewing failed: not again in the background before this.
    failed_until: Option<Instant>,
    /// A lease is being asked for; those who need one wait for it here.
    asking: Option<Arc<Notify>>,
}

impl SharedLimit {
    pub(super) fn new(
        store: Arc<SharedStore>,
        label: &str,
        interval_ns: u64,
        tolerance_ns: u64,
        on_error: OnStoreError,
        lease: u32,
    ) -> SharedLimit {
        let interval_us = (interval_ns / 1_000).max(1);
        SharedLimit {
            inner: Arc::new(Inner {
                store,
                script: redis::Script::new(GCRA),
                prefix: format!("fanout:rl:{label}:").into_bytes(),
                interval_us,
                tolerance_us: tolerance_ns / 1_000,
                lease,
                leases: Mutex::new(HashMap::new()),
            }),
            on_error,
        }
    }

    /// Leased mode: the decision this instance can make alone (a token of its lease, or a
    /// refusal while Redis said the bucket is empty); `None`: Redis must be asked
    /// ([`Self::check`]).
    pub fn local(&self, key: &[u8], now: Instant) -> Option<Decision> {
        let inner = &self.inner;
        if inner.lease == 0 {
            return None;
        }
        let hash = crate::keys::stable_hash(key);
        let mut leases = inner.leases.lock();
        let lease = leases.get_mut(&hash)?;
        if lease.expires.is_some_and(|e| e <= now) {
            lease.tokens = 0;
        }
        if lease.tokens > 0 {
            lease.tokens -= 1;
            let remaining = lease.tokens as u64;
            let due = lease.empty_until.is_none_or(|t| t <= now)
                && lease.failed_until.is_none_or(|t| t <= now);
            if lease.tokens <= inner.lease / 2 && lease.asking.is_none() && due {
                lease.asking = Some(Arc::new(Notify::new()));
                let (inner, key) = (Arc::clone(inner), key.to_vec());
                tokio::spawn(async move {
                    let _ = inner.renew(&key, hash).await;
                });
            }
            return Some(Decision::Allow { remaining });
        }
        match lease.empty_until {
            Some(t) if t > now => Some(Decision::Deny {
                retry_after_secs: (t - now).as_secs_f64().ceil().max(1.0) as u64,
            }),
            _ => None,
        }
    }

    /// Takes one token for `key` from the shared bucket, if there is one (leased mode:
    /// takes a lease, or waits for the one being taken, and a token of it).
    pub async fn check(&self, key: &[u8]) -> Result<Decision, StoreError> {
        let inner = &self.inner;
        if inner.lease == 0 {
            let (taken, n) = inner.take(key, 1).await?;
            let n = u64::try_from(n).unwrap_or(0);
            return Ok(if taken > 0 {
                Decision::Allow { remaining: n }
            } else {
                Decision::Deny {
                    retry_after_secs: n.div_ceil(1_000_000).max(1),
                }
            });
        }
        let hash = crate::keys::stable_hash(key);
        let deadline = Instant::now() + inner.store.timeout();
        loop {
            let now = Instant::now();
            if let Some(decision) = self.local(key, now) {
                return Ok(decision);
            }
            // No token here: ask for a lease, or wait for the one being asked for.
            let waiting = {
                let mut leases = inner.leases.lock();
                if leases.len() >= LEASE_KEYS && !leases.contains_key(&hash) {
                    leases.retain(|_, l| l.asking.is_some() || l.expires.is_some_and(|e| e > now));
                    if leases.len() >= LEASE_KEYS {
                        leases.clear();
                    }
                }
                let lease = leases.entry(hash).or_default();
                if lease.failed_until.is_some_and(|t| t > now) {
                    // Redis just failed to lease: on_store_error decides.
                    return Err(StoreError::Connecting);
                }
                match &lease.asking {
                    Some(n) => Some(Arc::clone(n)),
                    None => {
                        lease.asking = Some(Arc::new(Notify::new()));
                        None
                    }
                }
            };
            let Some(notify) = waiting else {
                inner.renew(key, hash).await?;
                continue;
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // The lease may have come between the look above and the registration.
            let still_asking = inner
                .leases
                .lock()
                .get(&hash)
                .and_then(|l| l.asking.as_ref())
                .is_some_and(|a| Arc::ptr_eq(a, &notify));
            if still_asking {
                let left = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, notified).await.is_err() {
                    return Err(StoreError::Timeout);
                }
            }
        }
    }
}

impl Inner {
    /// Runs the script for up to `want` tokens of `key`'s bucket.
    async fn take(&self, key: &[u8], want: u32) -> Result<(i64, i64), StoreError> {
        let mut bucket = Vec::with_capacity(self.prefix.len() + key.len());
        bucket.extend_from_slice(&self.prefix);
        bucket.extend_from_slice(key);
        let mut invocation = self.script.key(bucket);
        invocation
            .arg(self.interval_us)
            .arg(self.tolerance_us)
            .arg(want);
        self.store.invoke("rate limits", &invocation).await
    }

    /// Asks Redis for a lease of `key` and adds it to what the instance holds; wakes whoever
    /// waits for it.
    async fn renew(&self, key: &[u8], hash: u64) -> Result<(), StoreError> {
        let got = self.take(key, self.lease).await;
        let now = Instant::now();
        let mut leases = self.leases.lock();
        let lease = leases.entry(hash).or_default();
        if let Some(n) = lease.asking.take() {
            n.notify_waiters();
        }
        let (taken, n) = match got {
            Ok(got) => got,
            Err(e) => {
                lease.failed_until = Some(now + Duration::from_millis(200));
                return Err(e);
            }
        };
        lease.failed_until = None;
        if taken > 0 {
            if lease.expires.is_some_and(|e| e <= now) {
                lease.tokens = 0;
            }
            lease.tokens = lease.tokens.saturating_add(taken as u32);
            lease.expires = Some(now + LEASE_TTL);
            lease.empty_until = None;
        } else {
            // Empty: ask again once half a lease has accrued.
            let wait_us = u64::try_from(n).unwrap_or(0)
                + self.interval_us * u64::from(self.lease / 2).saturating_sub(1);
            lease.empty_until = Some(now + Duration::from_micros(wait_us.max(1)));
        }
        Ok(())
    }
}
