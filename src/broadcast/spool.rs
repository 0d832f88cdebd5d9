//! The spool: accepted broadcast requests wait here until every target has them. One small
//! interface, [`Spool`], and two stores behind it: [`super::disk::DiskSpool`] (`spool:`
//! configured: an append-only segment log on local disk that outlives stops, upgrades and
//! crashes), [`MemorySpool`] (no `spool:`, or `store: memory`: bounded memory, gone with
//! the process) and [`super::redis::RedisSpool`] (`store: redis`: Redis Streams shared by
//! every instance).
//!
//! A request is put once with the names of its targets; the process that holds the right to
//! deliver ([`Spool::claim`]) is handed every stored request with the targets that still
//! need it ([`Spool::found`]), and reports each target done ([`Spool::done`]) once it has
//! the request or was given up on. What is done for all its targets is forgotten.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use pingora_http::RequestHeader;
use tokio::sync::{watch, Notify};

/// Where one request is in its spool: which of the store's logs (a Redis spool has one
/// stream per target; the others one log), and where in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub log: u32,
    pub segment: u64,
    pub offset: u64,
}

/// One accepted request, as spooled.
#[derive(Debug)]
pub struct Accepted {
    /// The route's label.
    pub route: String,
    /// The upstreams it is for, by name (indexes into this list identify a target).
    pub targets: Vec<String>,
    pub request_id: String,
    /// When the 202 was given, in milliseconds since the Unix epoch.
    pub accepted_ms: u64,
    pub header: RequestHeader,
    pub body: Bytes,
}

impl Accepted {
    /// The bytes it holds (head and body), the unit of the spool's quota.
    pub fn size(&self) -> u64 {
        let head: usize = self
            .header
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        (64 + head + self.header.raw_path().len() + self.body.len()) as u64
    }
}

/// A stored request the deliverer has not been handed before, with the targets (indexes
/// into `accepted.targets`) that do not have it yet.
pub struct Found {
    pub key: Key,
    pub pending: Vec<u16>,
    pub size: u64,
    pub accepted: Arc<Accepted>,
}

#[derive(Debug)]
pub enum PutError {
    /// No room: the client is told to come back later.
    Full,
    Io(io::Error),
    /// The shared store did not answer in time (it logs that itself, once per outage).
    Unavailable(String),
}

/// What waits for one target in a shared store, counted there (the whole fleet's view).
#[derive(Debug, Default, Clone, Copy)]
pub struct Backlog {
    pub pending: u64,
    pub bytes: u64,
    /// When the oldest was accepted (ms since the epoch); 0: none.
    pub oldest_ms: u64,
}

#[async_trait]
pub trait Spool: Send + Sync {
    /// Keeps `a` until every target has it; returns once it is as durable as the store
    /// promises (with a disk spool: as its `fsync` policy says).
    async fn put(&self, a: Arc<Accepted>) -> Result<(), PutError>;
    /// Waits for the right to deliver from this spool (another process may hold it) until
    /// `stop` turns true; `false` when it was not obtained.
    async fn claim(&self, stop: &mut watch::Receiver<bool>) -> bool;
    /// Stored requests not handed out before (at the first call: everything stored,
    /// including what earlier processes left), waiting up to `wait` when there are none.
    async fn found(&self, wait: Duration) -> Vec<Found>;
    /// A stored request again, when the deliverer did not keep it in memory.
    async fn load(&self, key: Key) -> io::Result<Arc<Accepted>>;
    /// `target` has the request (or was given up on).
    fn done(&self, key: Key, target: u16);
    /// Gives the right to deliver up, for the next process (a shared store: hands what
    /// this process holds to the other instances).
    async fn release(&self);
    /// Bytes held.
    fn bytes(&self) -> u64;
    /// Whether what it holds outlives the process (then a stopping process hands its
    /// deliveries over instead of trying to finish them).
    fn durable(&self) -> bool;
    /// Whether other instances deliver from the same store (then the backlog is counted
    /// by the store, [`Spool::backlog`], not by this process).
    fn shared(&self) -> bool {
        false
    }
    /// The (route label, upstream name) targets in force: a shared store reads theirs.
    fn follow(&self, _targets: &[(String, String)]) {}
    /// A shared store's count of what waits for a target.
    fn backlog(&self, _route: &str, _target: &str) -> Option<Backlog> {
        None
    }
}

/// The store when no `spool:` is configured: requests are held in memory, up to `max`
/// bytes, and lost with the process.
pub struct MemorySpool {
    max: u64,
    state: Mutex<MemoryState>,
    wake: Notify,
}

#[derive(Default)]
struct MemoryState {
    next: u64,
    bytes: u64,
    fresh: Vec<Found>,
    /// Targets still pending, and size, by offset.
    held: HashMap<u64, (usize, u64)>,
}

impl MemorySpool {
    pub fn new(max: u64) -> MemorySpool {
        MemorySpool {
            max,
            state: Mutex::default(),
            wake: Notify::new(),
        }
    }
}

#[async_trait]
impl Spool for MemorySpool {
    async fn put(&self, a: Arc<Accepted>) -> Result<(), PutError> {
        let size = a.size();
        {
            let mut s = self.state.lock();
            if s.bytes + size > self.max {
                return Err(PutError::Full);
            }
            s.bytes += size;
            s.next += 1;
            let key = Key {
                log: 0,
                segment: 0,
                offset: s.next,
            };
            let pending: Vec<u16> = (0..a.targets.len() as u16).collect();
            s.held.insert(key.offset, (pending.len(), size));
            s.fresh.push(Found {
                key,
                pending,
                size,
                accepted: a,
            });
        }
        self.wake.notify_one();
        Ok(())
    }

    async fn claim(&self, _stop: &mut watch::Receiver<bool>) -> bool {
        true
    }

    async fn found(&self, wait: Duration) -> Vec<Found> {
        let fresh = std::mem::take(&mut self.state.lock().fresh);
        if !fresh.is_empty() {
            return fresh;
        }
        let _ = tokio::time::timeout(wait, self.wake.notified()).await;
        std::mem::take(&mut self.state.lock().fresh)
    }

    async fn load(&self, _key: Key) -> io::Result<Arc<Accepted>> {
        // The deliverer keeps every request of a memory spool: nothing to read again.
        Err(io::Error::new(io::ErrorKind::NotFound, "not kept"))
    }

    fn done(&self, key: Key, _target: u16) {
        let mut s = self.state.lock();
        let Some((pending, size)) = s.held.get_mut(&key.offset) else {
            return;
        };
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            let size = *size;
            s.held.remove(&key.offset);
            s.bytes -= size;
        }
    }

    async fn release(&self) {}

    fn bytes(&self) -> u64 {
        self.state.lock().bytes
    }

    fn durable(&self) -> bool {
        false
    }
}

/// The version byte of an encoded request.
const FORMAT: u8 = 1;

/// Encodes a request for the disk: its route, targets, id and time, then the request head
/// (method, target, fields) and body, each length-prefixed.
pub fn encode(a: &Accepted) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(a.size() as usize + 64);
    b.put_u8(FORMAT);
    b.put_u64_le(a.accepted_ms);
    put_short(&mut b, a.route.as_bytes());
    b.put_u16_le(a.targets.len() as u16);
    for t in &a.targets {
        put_short(&mut b, t.as_bytes());
    }
    put_short(&mut b, a.request_id.as_bytes());
    put_short(&mut b, a.header.method.as_str().as_bytes());
    put_long(&mut b, a.header.raw_path());
    b.put_u16_le(a.header.headers.len() as u16);
    for (name, value) in a.header.headers.iter() {
        put_short(&mut b, name.as_str().as_bytes());
        put_long(&mut b, value.as_bytes());
    }
    put_long(&mut b, &a.body);
    b.to_vec()
}

fn put_short(b: &mut BytesMut, s: &[u8]) {
    let s = &s[..s.len().min(u16::MAX as usize)];
    b.put_u16_le(s.len() as u16);
    b.put_slice(s);
}

fn put_long(b: &mut BytesMut, s: &[u8]) {
    b.put_u32_le(s.len() as u32);
    b.put_slice(s);
}

/// Decodes what [`encode`] wrote; `None` for anything else.
pub fn decode(mut b: Bytes) -> Option<Accepted> {
    fn short(b: &mut Bytes) -> Option<Bytes> {
        let n = b.try_get_u16_le().ok()? as usize;
        (b.remaining() >= n).then(|| b.split_to(n))
    }
    fn long(b: &mut Bytes) -> Option<Bytes> {
        let n = b.try_get_u32_le().ok()? as usize;
        (b.remaining() >= n).then(|| b.split_to(n))
    }
    fn text(b: Bytes) -> Option<String> {
        String::from_utf8(b.to_vec()).ok()
    }
    if b.try_get_u8().ok()? != FORMAT {
        return None;
    }
    let accepted_ms = b.try_get_u64_le().ok()?;
    let route = text(short(&mut b)?)?;
    let n = b.try_get_u16_le().ok()?;
    let targets = (0..n)
        .map(|_| text(short(&mut b)?))
        .collect::<Option<Vec<_>>>()?;
    let request_id = text(short(&mut b)?)?;
    let method = short(&mut b)?;
    let path = long(&mut b)?;
    let fields = b.try_get_u16_le().ok()?;
    let mut header = RequestHeader::build(method.as_ref(), &path, Some(fields as usize)).ok()?;
    for _ in 0..fields {
        let name = text(short(&mut b)?)?;
        let value = http::HeaderValue::from_maybe_shared(long(&mut b)?).ok()?;
        header.append_header(name, value).ok()?;
    }
    let body = long(&mut b)?;
    Some(Accepted {
        route,
        targets,
        request_id,
        accepted_ms,
        header,
        body,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(body: &[u8]) -> Accepted {
        let mut header = RequestHeader::build("POST", b"/events?x=1", None).unwrap();
        header
            .append_header("content-type", "application/json")
            .unwrap();
        header.append_header("x-multi", "a").unwrap();
        header.append_header("x-multi", "b").unwrap();
        Accepted {
            route: "prefix:/events".into(),
            targets: vec!["audit".into(), "analytics".into()],
            request_id: "abc".into(),
            accepted_ms: 1_700_000_000_123,
            header,
            body: Bytes::copy_from_slice(body),
        }
    }

    #[test]
    fn a_request_survives_encoding() {
        let a = sample(b"{\"n\":1}");
        let back = decode(Bytes::from(encode(&a))).expect("decodes");
        assert_eq!(back.route, a.route);
        assert_eq!(back.targets, a.targets);
        assert_eq!(back.request_id, a.request_id);
        assert_eq!(back.accepted_ms, a.accepted_ms);
        assert_eq!(back.header.method, a.header.method);
        assert_eq!(back.header.raw_path(), a.header.raw_path());
        let multi: Vec<_> = back.header.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        assert_eq!(back.body, a.body);
    }

    #[test]
    fn anything_else_does_not_decode() {
        let bytes = encode(&sample(b"body"));
        for cut in 0..bytes.len() {
            assert!(
                decode(Bytes::copy_from_slice(&bytes[..cut])).is_none(),
                "{cut}"
            );
        }
        assert!(decode(Bytes::from_static(b"\x02garbage")).is_none());
    }

    #[tokio::test]
    async fn the_memory_spool_holds_up_to_its_size_and_forgets_what_is_done() {
        let spool = MemorySpool::new(1000);
        let a = Arc::new(sample(&[0u8; 300]));
        spool.put(Arc::clone(&a)).await.expect("room");
        spool.put(Arc::clone(&a)).await.expect("room");
        assert!(matches!(
            spool.put(Arc::clone(&a)).await,
            Err(PutError::Full)
        ));
        let found = spool.found(Duration::from_millis(1)).await;
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].pending, [0, 1]);
        spool.done(found[0].key, 0);
        assert!(matches!(
            spool.put(Arc::clone(&a)).await,
            Err(PutError::Full)
        ));
        spool.done(found[0].key, 1);
        spool.put(a).await.expect("room again");
    }
}
