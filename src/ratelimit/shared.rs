//! Rate limits shared by every fanout instance (`rate_limit.store: redis`): the route's
//! GCRA buckets live in Redis, one key per bucket, and each decision is one `EVALSHA` of
//! the script below — read the arrival time, compare, write the new one with an expiry —
//! which Redis runs atomically, so instances never race each other. The clock is Redis's
//! (`TIME`), so the instances' clocks need not agree. A key expires when its bucket would
//! be full again: a bucket at rest costs Redis nothing.
//!
//! Every decision is bounded by `redis.timeout`; a decision Redis does not give in time
//! (down, slow, unreachable) is a store error, counted, and the route's `on_store_error`
//! says whether the request goes through (`allow`) or gets 503 (`deny`). Connections are
//! made lazily and remade on their own: `pool` multiplexed connections to one server
//! (redis-rs' `ConnectionManager`, which reconnects after an I/O error), or one cluster
//! connection that follows the cluster's slots (`url:` given as a list).
//!
//! There is no local bucket in front: each request asks Redis, so the instances together
//! hold exactly the configured rate, whatever the balance between them (bench/RESULTS.md
//! gives what a decision costs).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;

use super::Decision;
use crate::config::{OnStoreError, RedisConfig, RedisServer};

/// GCRA in Redis. KEYS[1]: the bucket; ARGV[1]: the emission interval, ARGV[2]: the burst
/// tolerance, both in microseconds. Returns {1, tokens left} or {0, microseconds until the
/// next token}.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local nxt = tat + interval
local ahead = nxt - now
if ahead > tolerance then
  return {0, ahead - tolerance}
end
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.floor(ahead / 1000) + 1)
return {1, math.floor((tolerance - ahead) / interval)}
";

/// Why the store gave no decision.
#[derive(Debug)]
pub enum StoreError {
    /// No answer within `redis.timeout`.
    Timeout,
    /// Not connected (yet, or again): a connection is being made.
    Connecting,
    /// Redis answered with an error, or the connection failed.
    Redis(redis::RedisError),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Timeout => f.write_str("no answer from Redis in time"),
            StoreError::Connecting => f.write_str("not connected to Redis"),
            StoreError::Redis(e) => write!(f, "Redis: {e}"),
        }
    }
}

/// The connections to Redis, shared by every route with `store: redis`.
pub struct SharedStore {
    server: Server,
    timeout: Duration,
    script: redis::Script,
    /// Logs the first error of a run of them, not each one.
    failing: AtomicBool,
}

enum Server {
    Single(Box<Single>),
    Cluster(Arc<Cluster>),
}

/// `pool` managers, made on first use (they need a runtime), taken in turn.
struct Single {
    client: redis::Client,
    pool: usize,
    managers: OnceLock<Result<Vec<ConnectionManager>, String>>,
    next: AtomicUsize,
}

/// A cluster connection, made in the background and made again when it is lost.
struct Cluster {
    client: ClusterClient,
    conn: Mutex<Option<ClusterConnection>>,
    connecting: AtomicBool,
}

impl SharedStore {
    /// The store for `config`; connects nothing yet. Fails only on a URL the client library
    /// refuses (validation has checked them already).
    pub fn new(config: &RedisConfig) -> Result<SharedStore, String> {
        // The library's own timeouts sit just above ours, so that ours is the one that
        // fires and the connection is not torn down for a decision we gave up on.
        let server = match &config.server {
            RedisServer::Single(url) => Server::Single(Box::new(Single {
                client: redis::Client::open(url.as_str())
                    .map_err(|e| format!("redis.url {url:?}: {e}"))?,
                pool: config.pool,
                managers: OnceLock::new(),
                next: AtomicUsize::new(0),
            })),
            RedisServer::Cluster(urls) => Server::Cluster(Arc::new(Cluster {
                client: ClusterClient::builder(urls.iter().map(String::as_str))
                    .connection_timeout(config.timeout.max(Duration::from_millis(500)))
                    .response_timeout(config.timeout * 4)
                    .build()
                    .map_err(|e| format!("redis.url: {e}"))?,
                conn: Mutex::new(None),
                connecting: AtomicBool::new(false),
            })),
        };
        Ok(SharedStore {
            server,
            timeout: config.timeout,
            script: redis::Script::new(GCRA),
            failing: AtomicBool::new(false),
        })
    }

    /// Runs the GCRA script on `bucket`, bounded by the timeout.
    async fn take(
        &self,
        bucket: &[u8],
        interval_us: u64,
        tolerance_us: u64,
    ) -> Result<(i64, i64), StoreError> {
        let mut invocation = self.script.key(bucket);
        invocation.arg(interval_us).arg(tolerance_us);
        let asked = async {
            match &self.server {
                Server::Single(single) => {
                    let Single {
                        client,
                        pool,
                        managers,
                        next,
                    } = &**single;
                    let managers = managers
                        .get_or_init(|| connect_single(client, *pool, self.timeout))
                        .as_ref()
                        .map_err(|e| {
                            StoreError::Redis(redis::RedisError::from((
                                redis::ErrorKind::Client,
                                "cannot set up the connection",
                                e.clone(),
                            )))
                        })?;
                    let i = next.fetch_add(1, Ordering::Relaxed) % managers.len();
                    let mut conn = managers[i].clone();
                    invocation
                        .invoke_async(&mut conn)
                        .await
                        .map_err(StoreError::Redis)
                }
                Server::Cluster(cluster) => {
                    let mut conn = cluster.connection().ok_or(StoreError::Connecting)?;
                    let result = invocation.invoke_async(&mut conn).await;
                    if let Err(e) = &result {
                        if e.is_unrecoverable_error() || e.is_io_error() {
                            cluster.lost();
                        }
                    }
                    result.map_err(StoreError::Redis)
                }
            }
        };
        let result = match tokio::time::timeout(self.timeout, asked).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout),
        };
        match &result {
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    log::info!("rate limits: Redis answers again");
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    log::warn!("rate limits: {e}; on_store_error applies until it answers");
                }
            }
        }
        result
    }
}

/// `pool` lazily connecting managers: none connects until its first command, and each
/// reconnects by itself after an I/O error.
fn connect_single(
    client: &redis::Client,
    pool: usize,
    timeout: Duration,
) -> Result<Vec<ConnectionManager>, String> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
        .set_response_timeout(Some(timeout * 4))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    (0..pool.max(1))
        .map(|_| {
            ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                .map_err(|e| e.to_string())
        })
        .collect()
}

impl Cluster {
    /// The connection if there is one; else one is being made (in the background, one
    /// attempt at a time) and this request goes without.
    fn connection(self: &Arc<Self>) -> Option<ClusterConnection> {
        if let Some(conn) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(conn);
        }
        if !self.connecting.swap(true, Ordering::AcqRel) {
            let me = Arc::clone(self);
            tokio::spawn(async move {
                match me.client.get_async_connection().await {
                    Ok(conn) => {
                        *me.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
                    }
                    Err(e) => {
                        log::warn!("rate limits: cannot connect to the Redis Cluster: {e}");
                        // Give the cluster a moment before the next attempt.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                me.connecting.store(false, Ordering::Release);
            });
        }
        None
    }

    /// The connection failed for good: the next request makes a new one.
    fn lost(&self) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// One route's limit in the shared store.
pub struct SharedLimit {
    store: Arc<SharedStore>,
    /// `fanout:rl:<route>:`, to which the request's key is appended.
    prefix: Vec<u8>,
    interval_us: u64,
    tolerance_us: u64,
    pub on_error: OnStoreError,
}

impl SharedLimit {
    pub(super) fn new(
        store: Arc<SharedStore>,
        label: &str,
        interval_ns: u64,
        tolerance_ns: u64,
        on_error: OnStoreError,
    ) -> SharedLimit {
        let interval_us = (interval_ns / 1_000).max(1);
        SharedLimit {
            store,
            prefix: format!("fanout:rl:{label}:").into_bytes(),
            interval_us,
            tolerance_us: tolerance_ns / 1_000,
            on_error,
        }
    }

    /// Takes one token for `key` from the shared bucket, if there is one.
    pub async fn check(&self, key: &[u8]) -> Result<Decision, StoreError> {
        let mut bucket = Vec::with_capacity(self.prefix.len() + key.len());
        bucket.extend_from_slice(&self.prefix);
        bucket.extend_from_slice(key);
        let (allowed, n) = self
            .store
            .take(&bucket, self.interval_us, self.tolerance_us)
            .await?;
        let n = u64::try_from(n).unwrap_or(0);
        Ok(if allowed == 1 {
            Decision::Allow { remaining: n }
        } else {
            Decision::Deny {
                retry_after_secs: n.div_ceil(1_000_000).max(1),
            }
        })
    }
}
