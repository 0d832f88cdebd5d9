//! The connections to Redis (`redis:`), shared by everything several fanout instances hold
//! together: the shared rate limits ([`crate::ratelimit::shared`]) and the Redis spool of
//! broadcast deliveries ([`crate::broadcast::redis`]).
//!
//! Connections are made lazily and remade on their own: `pool` multiplexed connections to
//! one server (redis-rs' `ConnectionManager`, which reconnects after an I/O error), or one
//! cluster connection that follows the cluster's slots (`url:` given as a list). Every
//! command a request waits for is bounded by `redis.timeout`, but for a broadcast's append,
//! whose answer decides between 202 and 503 (see [`crate::broadcast::redis`]); background
//! work may give itself longer ([`RedisClient::within`]). A run of failures is logged once, when it
//! starts, and once more when Redis answers again.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, ScriptInvocation, Value};

use crate::config::{RedisConfig, RedisServer};

/// Why Redis gave no answer.
#[derive(Debug)]
pub enum StoreError {
    /// No answer within the timeout.
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

/// The connections to one Redis server or cluster.
pub struct RedisClient {
    server: Server,
    timeout: Duration,
    /// Set while Redis fails: the first error of a run is logged, not each one.
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

/// One connection, to a server or to the cluster: what commands run on.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisClient {
    /// The client for `config`; connects nothing yet. Fails only on a URL the client
    /// library refuses (validation has checked them already).
    pub fn new(config: &RedisConfig) -> Result<RedisClient, String> {
        // The library's own timeouts sit above ours, so that ours is the one that fires
        // and the connection is not torn down for an answer we gave up on.
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
                    .response_timeout(config.timeout.max(Duration::from_millis(250)) * 4)
                    .build()
                    .map_err(|e| format!("redis.url: {e}"))?,
                conn: Mutex::new(None),
                connecting: AtomicBool::new(false),
            })),
        };
        Ok(RedisClient {
            server,
            timeout: config.timeout,
            failing: AtomicBool::new(false),
        })
    }

    /// `redis.timeout`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A connection to run commands on (cheap: connections are shared and multiplexed).
    pub fn conn(&self) -> Result<Conn, StoreError> {
        match &self.server {
            Server::Single(single) => {
                let managers = single
                    .managers
                    .get_or_init(|| connect_single(&single.client, single.pool, self.timeout))
                    .as_ref()
                    .map_err(|e| {
                        StoreError::Redis(redis::RedisError::from((
                            redis::ErrorKind::Client,
                            "cannot set up the connection",
                            e.clone(),
                        )))
                    })?;
                let i = single.next.fetch_add(1, Ordering::Relaxed) % managers.len();
                Ok(Conn::Single(managers[i].clone()))
            }
            Server::Cluster(cluster) => cluster
                .connection()
                .map(Conn::Cluster)
                .ok_or(StoreError::Connecting),
        }
    }

    /// Runs a script, bounded by `redis.timeout`.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        what: &str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.invoke_within(self.timeout, what, invocation).await
    }

    /// Runs a script, bounded by `limit`.
    pub async fn invoke_within<T: FromRedisValue>(
        &self,
        limit: Duration,
        what: &str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.within(limit, what, |mut c| async move {
            invocation.invoke_async(&mut c).await
        })
        .await
    }

    /// Runs `f` on a connection, bounded by `limit`; a failure or timeout is reported as
    /// described in the module's documentation, with `what` naming who asked.
    pub async fn within<T, F, Fut>(
        &self,
        limit: Duration,
        what: &str,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = match self.conn() {
            Ok(conn) => match tokio::time::timeout(limit, f(conn)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => {
                    if let Server::Cluster(cluster) = &self.server {
                        if e.is_unrecoverable_error() || e.is_io_error() {
                            cluster.lost();
                        }
                    }
                    Err(StoreError::Redis(e))
                }
                Err(_) => Err(StoreError::Timeout),
            },
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    log::info!("redis: answers again ({what})");
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    log::warn!("redis: {e} ({what})");
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
        .set_response_timeout(Some(timeout.max(Duration::from_millis(250)) * 4))
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
    /// attempt at a time) and this command goes without.
    fn connection(self: &Arc<Self>) -> Option<ClusterConnection> {
        if let Some(conn) = self.conn.lock().clone() {
            return Some(conn);
        }
        if !self.connecting.swap(true, Ordering::AcqRel) {
            let me = Arc::clone(self);
            tokio::spawn(async move {
                match me.client.get_async_connection().await {
                    Ok(conn) => {
                        *me.conn.lock() = Some(conn);
                    }
                    Err(e) => {
                        log::warn!("redis: cannot connect to the Redis Cluster: {e}");
                        // Give the cluster a moment before the next attempt.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                me.connecting.store(false, Ordering::Release);
            });
        }
        None
    }

    /// The connection failed for good: the next command makes a new one.
    fn lost(&self) {
        *self.conn.lock() = None;
    }
}
