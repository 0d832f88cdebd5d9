//! [`RedisSpool`] (`spool.store: redis`): the spool as Redis Streams shared by every fanout
//! instance on the same `redis:`, so that a 202 outlives the machine that gave it and any
//! instance delivers.
//!
//! - **Keys.** One stream per broadcast target, `fanout:spool:{ROUTE}:TARGET`, beside a
//!   counter of the bytes it holds, `…:bytes`. The braces are a Redis Cluster hash tag:
//!   every key of one route lives in one slot, so one script appends a request to all of
//!   its targets atomically.
//! - **Accepting** is one `EVALSHA` that checks every target's byte count against
//!   `spool.max_size` (over it: 503, as with the disk spool) and `XADD`s the encoded request
//!   to each target's stream. The 202 goes out once Redis has answered: what Redis then
//!   loses is what its persistence gives up (checked and logged at start-up: with AOF
//!   `appendfsync always` nothing, with `everysec` about the last second's writes on a
//!   crash of the Redis host, with no AOF everything since the last snapshot).
//! - **Delivering.** Each stream has one consumer group, `fanout`; each process is one
//!   consumer (host, pid and a random tag). A process reads (`XREADGROUP … >`) at most
//!   [`HOLD`] entries per stream beyond those it is working on, so that a long queue is
//!   shared among the instances rather than taken by the first. An entry is acknowledged
//!   (`XACK`, then `XDEL` and the byte count lowered, in one script, only by the first
//!   acknowledgement) once its target accepted it or gave it up. While an entry waits for
//!   a retry, its holder renews its claim (resets its idle time) every third of
//!   `claim_after`; entries idle longer than `claim_after`, held by an instance that
//!   stopped answering (`kill -9`, a lost machine), are taken over by another
//!   (`XAUTOCLAIM`). A process that stops gracefully marks what it holds as idle, so the
//!   others take it at their next look (every half of `claim_after`).
//! - **Counting.** `/status` and the spool gauges show every target's entries, bytes and
//!   oldest entry from the stream itself (read once a second), i.e. the whole fleet's
//!   backlog, not one instance's share.
//!
//! Retries follow the target's `broadcast_retry` within the instance that holds the
//! delivery; `max_age` counts from the 202 wherever the delivery moves, the attempt count
//! starts again on the instance that takes a delivery over. A delivery taken over while
//! an attempt was in flight elsewhere may be sent twice; both carry the request's
//! `Idempotency-Key` and `X-Request-Id`.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamRangeReply, StreamReadReply};
use tokio::sync::{watch, Notify};

use super::spool::{self, Accepted, Backlog, Found, Key, PutError, Spool};
use crate::outbound::redis::{RedisClient, StoreError};

/// Entries a process holds per stream at most (reading no more until some are done).
pub const HOLD: usize = 128;
/// The consumer group of every stream.
const GROUP: &str = "fanout";
/// Consumers without pending entries idle this long are removed from their group.
const FORGET_CONSUMER_MS: u64 = 3_600_000;
/// A broadcast's append waits this long for Redis's answer (or `redis.timeout`, if
/// longer): a 503 is only for an append that did not land, as far as the gateway can know.
const APPEND_WAIT: Duration = Duration::from_secs(1);
/// Background work (reading, acknowledging, claiming) waits at most this long for Redis.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(2);

/// Appends a request to every target's stream when each has room. KEYS: stream, bytes,
/// stream, bytes, ...; ARGV[1]: `max_size`, ARGV[2]: the request's size, ARGV[3]: the
/// encoded request, ARGV[4]: the group. Returns 1, or 0 when a stream is full.
const PUT: &str = r"
local max = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
for i = 2, #KEYS, 2 do
  if tonumber(redis.call('GET', KEYS[i]) or '0') + size > max then return 0 end
end
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('XGROUP', 'CREATE', KEYS[i], ARGV[4], '0', 'MKSTREAM')
  end
  redis.call('XADD', KEYS[i], '*', 'r', ARGV[3], 's', ARGV[2])
  redis.call('INCRBY', KEYS[i + 1], size)
end
return 1
";

/// Acknowledges entries: KEYS[1] the stream, KEYS[2] its bytes; ARGV[1] the group, then
/// pairs of (id, size). Only the first acknowledgement of an entry deletes it and lowers
/// the byte count. Returns the bytes freed.
const DONE: &str = r"
local freed = 0
for i = 2, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    freed = freed + tonumber(ARGV[i + 1])
  end
end
if freed > 0 then
  local left = redis.call('DECRBY', KEYS[2], freed)
  if left < 0 then redis.call('SET', KEYS[2], '0') end
end
return freed
";

/// Renews the consumer's claim on entries it still owns (those another took over are left
/// alone), setting their idle time: KEYS[1] the stream; ARGV[1] the group, ARGV[2] the
/// consumer, ARGV[3] the idle time to set in ms, then ids. Returns how many it still owns.
const HOLD_SCRIPT: &str = r"
local mine = {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p == 1 then mine[#mine + 1] = ARGV[i] end
end
if #mine > 0 then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine), 'IDLE', ARGV[3], 'JUSTID')
end
return #mine
";

/// A stream's length, byte count and first entry's id (its payload stays in Redis).
const CENSUS: &str = r"
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local id = ''
if first[1] then id = first[1][1] end
return {redis.call('XLEN', KEYS[1]), tonumber(redis.call('GET', KEYS[2]) or '0'), id}
";

/// The spool in Redis Streams.
pub struct RedisSpool(Arc<Inner>);

struct Inner {
    client: Arc<RedisClient>,
    max: u64,
    claim_after: Duration,
    consumer: String,
    put: redis::Script,
    done: redis::Script,
    hold: redis::Script,
    census: redis::Script,
    streams: Mutex<Streams>,
    /// A request was put here: read at once.
    wake: Notify,
    /// Acknowledgements waiting to be sent, by stream.
    acks: Mutex<HashMap<u32, Vec<(String, u64)>>>,
    ack_wake: Notify,
    /// Set once the process stops reading.
    stopping: AtomicBool,
    last_claim: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Streams {
    list: Vec<Arc<Stream>>,
    by_target: HashMap<(String, String), u32>,
    /// Those of the targets in force, read from.
    active: Vec<u32>,
}

/// One target's stream.
struct Stream {
    index: u32,
    target: String,
    key: String,
    bytes_key: String,
    /// Entries handed to the deliverer and not done, with their sizes, by id.
    held: Mutex<HashMap<String, u64>>,
    /// The consumer group is known to exist.
    grouped: AtomicBool,
    /// The whole fleet's backlog, as last counted.
    backlog: Mutex<Option<Backlog>>,
}

/// The keys of a (route, target) pair's stream: the route inside braces (a hash tag).
pub fn stream_key(route: &str, target: &str) -> String {
    let tag: String = route
        .chars()
        .map(|c| if c == '{' || c == '}' { '_' } else { c })
        .collect();
    format!("fanout:spool:{{{tag}}}:{target}")
}

fn entry_key(stream: u32, id: &str) -> Option<Key> {
    let (ms, seq) = id.split_once('-')?;
    Some(Key {
        log: stream,
        segment: ms.parse().ok()?,
        offset: seq.parse().ok()?,
    })
}

fn entry_id(key: Key) -> String {
    format!("{}-{}", key.segment, key.offset)
}

impl RedisSpool {
    pub fn new(client: Arc<RedisClient>, max: u64, claim_after: Duration) -> RedisSpool {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        let tag = (crate::http::request_id::unit_random() * 1e6) as u64;
        RedisSpool(Arc::new(Inner {
            client,
            max,
            claim_after,
            consumer: format!("{host}-{}-{tag:06}", std::process::id()),
            put: redis::Script::new(PUT),
            done: redis::Script::new(DONE),
            hold: redis::Script::new(HOLD_SCRIPT),
            census: redis::Script::new(CENSUS),
            streams: Mutex::default(),
            wake: Notify::new(),
            acks: Mutex::default(),
            ack_wake: Notify::new(),
            stopping: AtomicBool::new(false),
            last_claim: Mutex::new(None),
        }))
    }
}

#[async_trait]
impl Spool for RedisSpool {
    async fn put(&self, a: Arc<Accepted>) -> Result<(), PutError> {
        let inner = &self.0;
        let size = a.size();
        let mut invocation = inner.put.prepare_invoke();
        for target in &a.targets {
            let key = stream_key(&a.route, target);
            invocation.key(key.clone());
            invocation.key(format!("{key}:bytes"));
        }
        invocation
            .arg(inner.max)
            .arg(size)
            .arg(spool::encode(&a))
            .arg(GROUP);
        // Once sent, the append's answer is awaited longer than `redis.timeout`: a 503 for
        // an append that then lands would have the client send the event again, and the
        // targets get it twice with nothing to tell the copies apart.
        let limit = inner.client.timeout().max(APPEND_WAIT);
        match inner
            .client
            .invoke_within::<i64>(limit, "broadcast spool", &invocation)
            .await
        {
            Ok(1) => {
                inner.wake.notify_one();
                Ok(())
            }
            Ok(_) => Err(PutError::Full),
            Err(e) => Err(PutError::Unavailable(e.to_string())),
        }
    }

    async fn claim(&self, _stop: &mut watch::Receiver<bool>) -> bool {
        // Every instance is a consumer: there is nothing to wait for.
        tokio::spawn(check_persistence(Arc::clone(&self.0.client)));
        tokio::spawn(acknowledge(Arc::clone(&self.0)));
        tokio::spawn(maintain(Arc::clone(&self.0)));
        log::info!(
            "spool: Redis Streams, consumer {} of group {GROUP}",
            self.0.consumer
        );
        true
    }

    async fn found(&self, wait: Duration) -> Vec<Found> {
        let inner = &self.0;
        if inner.stopping.load(Relaxed) {
            tokio::time::sleep(wait).await;
            return Vec::new();
        }
        let mut out = inner.take_over().await;
        out.extend(inner.read().await);
        if out.is_empty() {
            let _ = tokio::time::timeout(wait, inner.wake.notified()).await;
            out.extend(inner.read().await);
        }
        out
    }

    async fn load(&self, key: Key) -> io::Result<Arc<Accepted>> {
        let inner = &self.0;
        let stream = inner
            .stream(key.log)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "unknown stream"))?;
        let id = entry_id(key);
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(&stream.key).arg(&id).arg(&id);
        let reply: StreamRangeReply = inner
            .command(&cmd)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        reply
            .ids
            .first()
            .and_then(decode)
            .map(Arc::new)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no longer in the stream"))
    }

    fn done(&self, key: Key, _target: u16) {
        let inner = &self.0;
        let Some(stream) = inner.stream(key.log) else {
            return;
        };
        let id = entry_id(key);
        let size = stream.held.lock().remove(&id).unwrap_or(0);
        inner
            .acks
            .lock()
            .entry(key.log)
            .or_default()
            .push((id, size));
        inner.ack_wake.notify_one();
    }

    async fn release(&self) {
        let inner = &self.0;
        inner.stopping.store(true, Relaxed);
        inner.flush_acks().await;
        // What this process still holds is marked idle for `claim_after`: another instance
        // takes it over at its next look instead of waiting.
        let idle = inner.claim_after.as_millis() as u64 + 1_000;
        let mut handed = 0;
        for stream in inner.all_streams() {
            let ids: Vec<String> = stream.held.lock().keys().cloned().collect();
            handed += inner.renew(&stream, &ids, idle).await;
        }
        log::info!("spool: {handed} deliveries held by this process handed to the other instances");
    }

    fn follow(&self, targets: &[(String, String)]) {
        let mut s = self.0.streams.lock();
        let mut active = Vec::new();
        for (route, target) in targets {
            let index = match s.by_target.get(&(route.clone(), target.clone())) {
                Some(i) => *i,
                None => {
                    let index = s.list.len() as u32;
                    let key = stream_key(route, target);
                    s.list.push(Arc::new(Stream {
                        index,
                        target: target.clone(),
                        bytes_key: format!("{key}:bytes"),
                        key,
                        held: Mutex::default(),
                        grouped: AtomicBool::new(false),
                        backlog: Mutex::new(None),
                    }));
                    s.by_target.insert((route.clone(), target.clone()), index);
                    index
                }
            };
            active.push(index);
        }
        s.active = active;
        drop(s);
        self.0.wake.notify_one();
    }

    fn backlog(&self, route: &str, target: &str) -> Option<Backlog> {
        let s = self.0.streams.lock();
        let i = s.by_target.get(&(route.to_string(), target.to_string()))?;
        let stream = s.list.get(*i as usize)?;
        let b = *stream.backlog.lock();
        Some(b.unwrap_or_default())
    }

    fn bytes(&self) -> u64 {
        self.0
            .all_streams()
            .iter()
            .filter_map(|s| s.backlog.lock().map(|b| b.bytes))
            .sum()
    }

    fn durable(&self) -> bool {
        true
    }

    fn shared(&self) -> bool {
        true
    }
}

/// The request in a stream entry.
fn decode(entry: &StreamId) -> Option<Accepted> {
    match entry.map.get("r")? {
        redis::Value::BulkString(b) => spool::decode(Bytes::copy_from_slice(b)),
        _ => None,
    }
}

impl Inner {
    /// Runs a command for the spool's background work.
    async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        self.client
            .within(BACKGROUND_TIMEOUT, "broadcast spool", |mut c| async move {
                cmd.query_async(&mut c).await
            })
            .await
    }

    /// Runs a script for the spool's background work.
    async fn script<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.client
            .within(BACKGROUND_TIMEOUT, "broadcast spool", |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await
    }

    fn stream(&self, index: u32) -> Option<Arc<Stream>> {
        self.streams.lock().list.get(index as usize).cloned()
    }

    fn all_streams(&self) -> Vec<Arc<Stream>> {
        self.streams.lock().list.clone()
    }

    fn active(&self) -> Vec<Arc<Stream>> {
        let s = self.streams.lock();
        s.active
            .iter()
            .filter_map(|i| s.list.get(*i as usize).cloned())
            .collect()
    }

    /// Makes sure the stream's consumer group exists (it is made with the stream).
    async fn group(&self, stream: &Stream) -> bool {
        if stream.grouped.load(Relaxed) {
            return true;
        }
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&stream.key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        let made = self.command::<()>(&cmd).await;
        let ok = match made {
            Ok(()) => true,
            Err(StoreError::Redis(e)) => e.code() == Some("BUSYGROUP"),
            Err(_) => false,
        };
        stream.grouped.store(ok, Relaxed);
        ok
    }

    /// Room for more entries on a stream, for this process.
    fn room(stream: &Stream) -> usize {
        HOLD.saturating_sub(stream.held.lock().len())
    }

    /// New entries of every target in force, as many as there is room for.
    async fn read(&self) -> Vec<Found> {
        let mut out = Vec::new();
        for stream in self.active() {
            let room = Self::room(&stream);
            if room == 0 || !self.group(&stream).await {
                continue;
            }
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(room)
                .arg("STREAMS")
                .arg(&stream.key)
                .arg(">");
            let reply = self.command::<Option<StreamReadReply>>(&cmd).await;
            match reply {
                Ok(Some(reply)) => {
                    for key in reply.keys {
                        self.hand_out(&stream, key.ids, &mut out);
                    }
                }
                Ok(None) => {}
                Err(StoreError::Redis(e)) if e.code() == Some("NOGROUP") => {
                    stream.grouped.store(false, Relaxed);
                }
                Err(_) => {}
            }
        }
        out
    }

    /// Entries held by silent consumers for longer than `claim_after`, taken over (at most
    /// every half of `claim_after`).
    async fn take_over(&self) -> Vec<Found> {
        {
            let mut last = self.last_claim.lock();
            let every = self.claim_after / 2;
            if last.is_some_and(|t| t.elapsed() < every) {
                return Vec::new();
            }
            *last = Some(Instant::now());
        }
        let mut out = Vec::new();
        let min_idle = self.claim_after.as_millis() as u64;
        for stream in self.active() {
            let mut cursor = "0-0".to_string();
            loop {
                let room = Self::room(&stream);
                if room == 0 || !self.group(&stream).await {
                    break;
                }
                let mut cmd = redis::cmd("XAUTOCLAIM");
                cmd.arg(&stream.key)
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .arg(min_idle)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(room);
                let reply = self.command::<StreamAutoClaimReply>(&cmd).await;
                let Ok(reply) = reply else { break };
                if !reply.claimed.is_empty() {
                    log::info!(
                        "spool: took over {} deliveries for {} from a silent instance",
                        reply.claimed.len(),
                        stream.target
                    );
                }
                self.hand_out(&stream, reply.claimed, &mut out);
                if reply.next_stream_id == "0-0" {
                    break;
                }
                cursor = reply.next_stream_id;
            }
        }
        out
    }

    /// Turns stream entries into deliveries for the deliverer; what cannot be read is
    /// acknowledged and logged (it could never be delivered).
    fn hand_out(&self, stream: &Stream, entries: Vec<StreamId>, out: &mut Vec<Found>) {
        for entry in entries {
            let Some(key) = entry_key(stream.index, &entry.id) else {
                continue;
            };
            let size = match entry.map.get("s") {
                Some(redis::Value::BulkString(b)) => std::str::from_utf8(b)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                _ => 0,
            };
            stream.held.lock().insert(entry.id.clone(), size);
            let accepted = decode(&entry);
            let index = accepted
                .as_ref()
                .and_then(|a| a.targets.iter().position(|t| *t == stream.target));
            match (accepted, index) {
                (Some(accepted), Some(index)) => out.push(Found {
                    key,
                    pending: vec![index as u16],
                    size,
                    accepted: Arc::new(accepted),
                }),
                _ => {
                    log::error!(
                        "spool: entry {} of {} cannot be read: removed",
                        entry.id,
                        stream.key
                    );
                    stream.held.lock().remove(&entry.id);
                    self.acks
                        .lock()
                        .entry(stream.index)
                        .or_default()
                        .push((entry.id, size));
                }
            }
        }
    }

    /// Sets the idle time of the entries of `ids` this consumer still owns; returns how
    /// many it owns.
    async fn renew(&self, stream: &Stream, ids: &[String], idle_ms: u64) -> usize {
        let mut owned = 0;
        for chunk in ids.chunks(256) {
            let mut invocation = self.hold.key(&stream.key);
            invocation.arg(GROUP).arg(&self.consumer).arg(idle_ms);
            for id in chunk {
                invocation.arg(id);
            }
            let got = self.script::<usize>(&invocation).await;
            owned += got.unwrap_or(0);
        }
        owned
    }

    /// Sends the acknowledgements waiting; those Redis did not take wait for the next try.
    async fn flush_acks(&self) {
        let acks = std::mem::take(&mut *self.acks.lock());
        for (index, list) in acks {
            let Some(stream) = self.stream(index) else {
                continue;
            };
            for chunk in list.chunks(256) {
                let mut invocation = self.done.key(&stream.key);
                invocation.key(&stream.bytes_key).arg(GROUP);
                for (id, size) in chunk {
                    invocation.arg(id).arg(*size);
                }
                let sent = self.script::<i64>(&invocation).await;
                if sent.is_err() {
                    self.acks
                        .lock()
                        .entry(index)
                        .or_default()
                        .extend(chunk.iter().cloned());
                }
            }
        }
    }

    /// Counts every target's backlog in its stream.
    async fn count(&self) {
        for stream in self.active() {
            let mut invocation = self.census.key(&stream.key);
            invocation.key(&stream.bytes_key);
            let got = self.script::<(u64, u64, String)>(&invocation).await;
            if let Ok((pending, bytes, first)) = got {
                let oldest_ms = entry_key(0, &first).map_or(0, |k| k.segment);
                *stream.backlog.lock() = Some(Backlog {
                    pending,
                    bytes,
                    oldest_ms,
                });
            }
        }
    }

    /// Removes consumers long silent that hold nothing (every process start adds one).
    async fn forget_consumers(&self) {
        for stream in self.active() {
            let mut cmd = redis::cmd("XINFO");
            cmd.arg("CONSUMERS").arg(&stream.key).arg(GROUP);
            let got = self
                .command::<Vec<HashMap<String, redis::Value>>>(&cmd)
                .await;
            let Ok(consumers) = got else { continue };
            for c in consumers {
                let int = |k: &str| match c.get(k) {
                    Some(redis::Value::Int(n)) => *n as u64,
                    _ => 0,
                };
                let name = match c.get("name") {
                    Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => continue,
                };
                if int("pending") == 0 && int("idle") > FORGET_CONSUMER_MS && name != self.consumer
                {
                    let mut cmd = redis::cmd("XGROUP");
                    cmd.arg("DELCONSUMER")
                        .arg(&stream.key)
                        .arg(GROUP)
                        .arg(&name);
                    let _ = self.command::<i64>(&cmd).await;
                }
            }
        }
    }
}

/// Sends acknowledgements as they come, in batches.
async fn acknowledge(inner: Arc<Inner>) {
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(1), inner.ack_wake.notified()).await;
        inner.flush_acks().await;
        if !inner.acks.lock().is_empty() {
            // Redis did not take them: try again in a moment.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Once a second: the backlog count; every third of `claim_after`: the claim on held
/// entries renewed; every ten minutes: silent consumers forgotten.
async fn maintain(inner: Arc<Inner>) {
    let renew_every = (inner.claim_after / 3).max(Duration::from_millis(100));
    let mut last_renew = Instant::now();
    let mut last_forget: Option<Instant> = None;
    loop {
        inner.count().await;
        if last_renew.elapsed() >= renew_every && !inner.stopping.load(Relaxed) {
            last_renew = Instant::now();
            for stream in inner.all_streams() {
                let ids: Vec<String> = stream.held.lock().keys().cloned().collect();
                if !ids.is_empty() {
                    inner.renew(&stream, &ids, 0).await;
                }
            }
        }
        if last_forget.is_none_or(|t| t.elapsed() > Duration::from_secs(600)) {
            last_forget = Some(Instant::now());
            inner.forget_consumers().await;
        }
        tokio::time::sleep(renew_every.min(Duration::from_secs(1))).await;
    }
}

/// Logs what Redis's persistence lets a 202 survive.
async fn check_persistence(client: Arc<RedisClient>) {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg("append*");
    let got = client
        .within(BACKGROUND_TIMEOUT, "broadcast spool", |mut c| async move {
            cmd.query_async::<HashMap<String, String>>(&mut c).await
        })
        .await;
    let config = match got {
        Ok(c) => c,
        Err(e) => {
            log::warn!("spool: cannot read Redis's persistence settings ({e}): what a Redis crash loses is unknown");
            return;
        }
    };
    let aof = config.get("appendonly").map(String::as_str);
    let fsync = config.get("appendfsync").map(String::as_str);
    match (aof, fsync) {
        (Some("yes"), Some("always")) => log::info!(
            "spool: Redis appends every write to its AOF and syncs it (appendfsync always): \
             nothing that got a 202 is lost when Redis or its host crashes"
        ),
        (Some("yes"), Some(f)) => log::warn!(
            "spool: Redis's AOF is synced {} (appendfsync {f}): a crash of the Redis host \
             can lose the requests accepted in about the last second; `appendfsync always` \
             loses none",
            if f == "everysec" {
                "once a second"
            } else {
                "by the OS"
            }
        ),
        _ => log::warn!(
            "spool: Redis persistence is off (appendonly no): a restart of Redis loses every \
             request accepted and not yet delivered; set `appendonly yes` and `appendfsync \
             everysec` or `always`"
        ),
    }
}
