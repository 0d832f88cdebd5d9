//! Pipelined HTTP/1.1 connections ("lanes") that carry a mirror's copies that are whole
//! when they start: copies without a body, and copies whose body arrived complete in its
//! first piece (up to 64 KiB, the common case for API bodies). Longer or trickling bodies
//! stream through the connector instead ([`crate::outbound::exchange`]), never buffered here.
//!
//! A copy sent on a connection of its own costs about as much as the upstream half of a
//! proxied request: a write that wakes the mirror, a read, pool bookkeeping. Behind a fast
//! mirror that halves the gateway's throughput. Whole copies need none of that per copy:
//! they are queued to a lane, and the lane's task writes every copy waiting at once and
//! reads the answers in order as they come, so one write and one read carry many copies.
//!
//! Pipelining must not let a slow mirror hold copies hostage, so a copy joins a busy lane
//! only while that lane is *fast*: its last answer took under [`FAST`] and the answer it
//! waits for now is not older than that. Otherwise the copy takes an idle lane or opens a
//! new one, as many as the mirror's `max_inflight` allows: behind a mirror that answers in a
//! second every copy has a connection of its own, as it would without pipelining.
//!
//! A lane that fails (connect error, reset, unparseable answer) fails the copies it carries;
//! a copy past the mirror's `timeout` ends its lane (the copies queued behind it would wait
//! as long). A lane that ends politely hands its copies over to other lanes, at the head of
//! an idle or new one so that no close can catch them again:
//! - an answer saying `Connection: close`: the mirror processed none of the copies written
//!   behind it (RFC 9112 §9.6), so every one of them goes again;
//! - a close after a complete answer without that header, or the end of an idle period:
//!   copies never written go again; written ones may have been processed, so only
//!   idempotent ones go again, once, and the others count as errors.
//!
//! Every copy ends answered or counted as an error: none is left unaccounted, whatever the
//! order in which a lane's end and a new copy's dispatch meet. A compared copy (`compare:`)
//! has its answer reduced by the reader as it passes and handed, or its failure, to its
//! comparison.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use super::compare::{Reduce, Seen};
use super::reader::{Awaited, Parsed, Reader};
use pingora_core::protocols::http::v1::client::http_req_header_to_wire;
use pingora_http::RequestHeader;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{CopyPermit, Mirror, Pairing};
use crate::upstream::eyeballs::ResolvedAddresses;
use crate::upstream::Lease;

/// Copies a lane carries at once at most.
const DEPTH: usize = 32;
/// A lane whose answers come faster than this takes more copies while busy.
const FAST: Duration = Duration::from_millis(5);
/// Times one copy may be handed from a closing lane to another before it counts as an
/// error: a guard against a mirror that closes every connection before answering.
const MAX_HANDOVERS: u8 = 16;

/// One copy waiting for, or travelling on, a lane.
struct Job {
    /// The request head, serialized.
    wire: Bytes,
    /// The whole body, if it has one.
    body: Option<Bytes>,
    idempotent: bool,
    /// A HEAD request: its answer has no body, whatever it declares.
    head: bool,
    lease: Lease,
    deadline: Instant,
    permit: CopyPermit,
    /// Times a closing lane handed this copy to another.
    handovers: u8,
    /// Written once to a lane that then closed without saying whether it processed it.
    maybe_processed: bool,
    /// With `compare`: the comparison its answer goes to, and how to reduce that answer.
    pairing: Option<(Pairing, Reduce)>,
}

/// Sends a copy's head, and its whole body if it has one, on a lane to the leased backend.
pub fn send(
    mirror: &Arc<Mirror>,
    header: &RequestHeader,
    body: Option<Bytes>,
    lease: Lease,
    permit: CopyPermit,
    pairing: Option<Pairing>,
) {
    let mut own_host;
    let header = match lease.backend().has_own_host() {
        false => header,
        true => {
            own_host = header.clone();
            let _ = lease.backend().set_host(&mut own_host);
            &own_host
        }
    };
    let Some(wire) = http_req_header_to_wire(header) else {
        mirror.outcomes.error.inc();
        if let Some(pairing) = pairing {
            pairing.conclude(mirror, None, permit);
        }
        return;
    };
    let reduce = mirror.compare.as_ref().map(|c| c.config.reduce());
    dispatch(
        mirror,
        Job {
            wire: wire.freeze(),
            body,
            idempotent: header.method.is_idempotent(),
            head: header.method == http::Method::HEAD,
            lease,
            deadline: Instant::now() + mirror.config.timeout,
            permit,
            handovers: 0,
            maybe_processed: false,
            pairing: pairing.zip(reduce),
        },
    );
}

impl Job {
    fn mirror(&self) -> &Arc<Mirror> {
        &self.permit.mirror
    }

    /// How the answer awaited for this copy is to be read.
    fn awaited(&self) -> Awaited {
        Awaited {
            head: self.head,
            reduce: self.pairing.as_ref().map(|(_, r)| *r),
        }
    }

    fn answered(mut self, status: u16, seen: Option<Seen>) {
        self.lease.answered(status);
        self.mirror().count_answer(status);
        self.end(seen);
    }

    fn failed(mut self, timeout: bool) {
        self.lease.failed(timeout);
        self.mirror().outcomes.error.inc();
        self.end(None);
    }

    /// Its backend could not be reached.
    fn unreachable(mut self, timeout: bool) {
        self.lease.unreachable(timeout);
        self.mirror().outcomes.error.inc();
        self.end(None);
    }

    /// Failed only because the copy ahead of it on the same connection did: counted for the
    /// mirror, not held against the backend (one bad connection carrying thirty copies must
    /// not count as thirty failures towards its circuit breaker).
    fn failed_behind(self) {
        self.mirror().outcomes.error.inc();
        self.end(None);
    }

    /// Hands a compared copy's answer (or its failure) to its comparison.
    fn end(self, seen: Option<Seen>) {
        if let Some((pairing, _)) = self.pairing {
            let mirror = Arc::clone(&self.permit.mirror);
            pairing.conclude(&mirror, seen, self.permit);
        }
    }
}

/// Time as microseconds since the lanes' epoch, for atomics.
fn micros(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_micros() as u64
}

/// One connection's shared state, read by copies choosing a lane.
struct Lane {
    tx: mpsc::UnboundedSender<Job>,
    /// Copies queued or awaiting their answer.
    outstanding: AtomicUsize,
    /// How long the last answer took (µs); `u64::MAX` until the first one.
    last_latency: AtomicU64,
    /// When the copy at the head of the line was written (µs since epoch; 0: none).
    head_sent: AtomicU64,
    closed: AtomicBool,
}

impl Lane {
    /// Whether a busy lane may take one more copy behind those it carries.
    fn takes_more(&self, now_us: u64) -> bool {
        let n = self.outstanding.load(Relaxed);
        let fast = FAST.as_micros() as u64;
        let head = self.head_sent.load(Relaxed);
        n < DEPTH
            && self.last_latency.load(Relaxed) < fast
            && (head == 0 || now_us.saturating_sub(head) < fast)
    }
}

/// The lanes to one backend of a mirror's upstream.
pub struct BackendLanes {
    addr: SocketAddr,
    /// A backend written by name: its addresses, tried in turn.
    addresses: Option<Arc<ResolvedAddresses>>,
    lanes: Mutex<Vec<Arc<Lane>>>,
    epoch: Instant,
}

/// The lanes of every backend of the mirror's upstream: by index in the set they started
/// with, and by address for backends DNS brought in later (rare: under a lock).
pub struct Lanes {
    first: Vec<Arc<BackendLanes>>,
    found: Mutex<HashMap<SocketAddr, Arc<BackendLanes>>>,
}

impl Lanes {
    pub fn new(backends: &[Arc<crate::upstream::BackendState>]) -> Lanes {
        Lanes {
            first: backends
                .iter()
                .map(|b| Arc::new(BackendLanes::new(b)))
                .collect(),
            found: Mutex::new(HashMap::new()),
        }
    }

    /// The lanes of `backend`, at `index` of the set it was chosen from.
    fn get(&self, index: usize, backend: &crate::upstream::BackendState) -> Arc<BackendLanes> {
        let addr = backend.addr;
        match self.first.get(index) {
            Some(lanes) if lanes.addr == addr => Arc::clone(lanes),
            _ => {
                let mut found = self.found.lock();
                // Backends DNS dropped go with their lanes' last copies.
                if found.len() > 4 * self.first.len().max(16) {
                    found.retain(|_, l| Arc::strong_count(l) > 1);
                }
                Arc::clone(
                    found
                        .entry(addr)
                        .or_insert_with(|| Arc::new(BackendLanes::new(backend))),
                )
            }
        }
    }
}

impl BackendLanes {
    pub fn new(backend: &crate::upstream::BackendState) -> BackendLanes {
        BackendLanes {
            addr: backend.addr,
            addresses: backend.addresses.clone(),
            lanes: Mutex::new(Vec::new()),
            epoch: Instant::now(),
        }
    }
}

/// Sends `job` on a lane to its backend: the fullest fast lane with room, else an idle
/// lane, else a new one; a handed-over copy only to an idle or new lane, at its head.
/// Never waits.
fn dispatch(mirror: &Arc<Mirror>, job: Job) {
    let backend = mirror.lanes.get(job.lease.index(), job.lease.backend());
    let now_us = micros(backend.epoch, Instant::now());
    let chosen = {
        let mut lanes = backend.lanes.lock();
        lanes.retain(|l| !l.closed.load(Relaxed));
        let busy_fast = lanes
            .iter()
            .filter(|_| job.handovers == 0)
            .filter(|l| l.outstanding.load(Relaxed) > 0 && l.takes_more(now_us))
            .max_by_key(|l| l.outstanding.load(Relaxed));
        let idle = || lanes.iter().find(|l| l.outstanding.load(Relaxed) == 0);
        let lane = match busy_fast.or_else(idle) {
            Some(lane) => Arc::clone(lane),
            None => {
                let lane = open(mirror, &backend);
                lanes.push(Arc::clone(&lane));
                lane
            }
        };
        // Counted under the lock: no other copy can take this lane for an idle one now.
        lane.outstanding.fetch_add(1, Relaxed);
        lane
    };
    if let Err(mpsc::error::SendError(job)) = chosen.tx.send(job) {
        // The lane ended meanwhile; it has not seen this copy.
        chosen.outstanding.fetch_sub(1, Relaxed);
        chosen.closed.store(true, Relaxed);
        dispatch(mirror, job);
    }
}

/// Starts a lane to `backend` (connecting in its task).
fn open(mirror: &Arc<Mirror>, backend: &BackendLanes) -> Arc<Lane> {
    let (tx, rx) = mpsc::unbounded_channel();
    let lane = Arc::new(Lane {
        tx,
        outstanding: AtomicUsize::new(0),
        last_latency: AtomicU64::new(u64::MAX),
        head_sent: AtomicU64::new(0),
        closed: AtomicBool::new(false),
    });
    let task = LaneTask {
        lane: Arc::clone(&lane),
        mirror: Arc::clone(mirror),
        rx,
        epoch: backend.epoch,
        pending: VecDeque::new(),
    };
    tokio::spawn(task.run(backend.addr, backend.addresses.clone()));
    lane
}

/// A copy written to the lane, waiting for its answer.
struct Sent {
    job: Job,
    at: Instant,
}

/// How a lane ended.
enum End {
    /// The connection could not be made: every copy waiting for it fails (the first
    /// tells the backend's breaker).
    Unreachable { timeout: bool },
    /// The mirror answered with `Connection: close`: it processed none of the copies
    /// written behind that answer, so all of them may go again.
    Announced,
    /// The mirror closed it after complete answers, or it sat idle: copies never written,
    /// and written idempotent ones, may go again.
    Polite,
    /// It failed: its copies failed with it.
    Failed { timeout: bool },
}

struct LaneTask {
    lane: Arc<Lane>,
    mirror: Arc<Mirror>,
    rx: mpsc::UnboundedReceiver<Job>,
    epoch: Instant,
    pending: VecDeque<Sent>,
}

impl LaneTask {
    async fn run(mut self, addr: SocketAddr, addresses: Option<Arc<ResolvedAddresses>>) {
        let t = &self.mirror.upstream.config.timeouts;
        let (connect, idle) = (t.connect, t.idle);
        let connected = match addresses {
            Some(addresses) => addresses.connect(connect).await,
            None => match tokio::time::timeout(connect, TcpStream::connect(addr)).await {
                Ok(connected) => connected,
                Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
            },
        };
        let end = match connected {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                self.serve(stream, idle).await
            }
            Err(e) => End::Unreachable {
                timeout: e.kind() == std::io::ErrorKind::TimedOut,
            },
        };
        self.finish(end);
    }

    /// Moves copies from the queue to the connection and answers back to copies, until
    /// the lane ends.
    async fn serve(&mut self, stream: TcpStream, idle: Duration) -> End {
        let mut out = BytesMut::new();
        let mut inb = BytesMut::with_capacity(16 * 1024);
        let mut reader = Reader::default();
        // One timer, moved only when its deadline changes: the oldest copy's deadline
        // while copies are out, else the end of the idle period.
        let mut idle_since = Instant::now();
        let mut due = idle_since + idle;
        let timer = tokio::time::sleep_until(due.into());
        tokio::pin!(timer);
        loop {
            let wanted = match self.pending.front() {
                Some(s) => s.job.deadline,
                None => idle_since + idle,
            };
            if wanted != due {
                due = wanted;
                timer.as_mut().reset(due.into());
            }
            tokio::select! {
                biased;
                ready = stream.readable() => {
                    if ready.is_err() {
                        return End::Failed { timeout: false };
                    }
                    match self.read_answers(&stream, &mut inb, &mut reader) {
                        Ok(true) => idle_since = Instant::now(),
                        Ok(false) => {}
                        Err(end) => return end,
                    }
                }
                ready = stream.writable(), if !out.is_empty() => {
                    if ready.is_err() || write_some(&stream, &mut out).is_err() {
                        return End::Failed { timeout: false };
                    }
                }
                job = self.rx.recv(), if self.pending.len() < DEPTH => {
                    let Some(job) = job else { return End::Polite };
                    self.take(job, &mut out);
                    while self.pending.len() < DEPTH {
                        match self.rx.try_recv() {
                            Ok(job) => self.take(job, &mut out),
                            Err(_) => break,
                        }
                    }
                    if write_some(&stream, &mut out).is_err() {
                        return End::Failed { timeout: false };
                    }
                }
                _ = &mut timer => {
                    if !self.pending.is_empty() {
                        return End::Failed { timeout: true };
                    }
                    if self.lane.outstanding.load(Relaxed) == 0 {
                        return End::Polite; // idle for the whole idle period
                    }
                    idle_since = Instant::now(); // a copy is on its way in
                }
            }
        }
    }

    /// Reads what arrived and hands each complete answer to its copy. `Ok(true)`: some copy
    /// was answered; `Err`: the lane ends.
    fn read_answers(
        &mut self,
        stream: &TcpStream,
        inb: &mut BytesMut,
        reader: &mut Reader,
    ) -> Result<bool, End> {
        match read_some(stream, inb) {
            Ok(None) => return Ok(false),
            Ok(Some(0)) => return Err(self.closed_by_mirror(reader, inb)),
            Ok(Some(_)) => {}
            Err(()) => return Err(End::Failed { timeout: false }),
        }
        let mut answered = false;
        loop {
            match reader.next(inb, self.pending.front().map(|s| s.job.awaited())) {
                Parsed::NeedMore => return Ok(answered),
                Parsed::Answer {
                    status,
                    close,
                    seen,
                } => {
                    let Some(sent) = self.pending.pop_front() else {
                        return Err(End::Failed { timeout: false });
                    };
                    if close {
                        // Closed before its count drops, so no copy takes it for idle.
                        self.lane.closed.store(true, Relaxed);
                    }
                    self.answered(sent, status, seen);
                    answered = true;
                    if close {
                        return Err(End::Announced);
                    }
                }
                Parsed::Invalid => return Err(End::Failed { timeout: false }),
            }
        }
    }

    /// The mirror closed the connection: fine between answers or at the end of one that
    /// lasts until the close, a failure within any other.
    fn closed_by_mirror(&mut self, reader: &mut Reader, inb: &BytesMut) -> End {
        if let Some((status, seen)) = reader.closed() {
            if let Some(sent) = self.pending.pop_front() {
                self.answered(sent, status, seen);
            }
            return End::Polite;
        }
        match reader.at_boundary() && inb.is_empty() {
            true => End::Polite,
            false => End::Failed { timeout: false },
        }
    }

    /// Queues a copy's head for writing.
    fn take(&mut self, job: Job, out: &mut BytesMut) {
        let now = Instant::now();
        if self.pending.is_empty() {
            self.lane
                .head_sent
                .store(micros(self.epoch, now).max(1), Relaxed);
        }
        out.extend_from_slice(&job.wire);
        if let Some(body) = &job.body {
            out.extend_from_slice(body);
        }
        self.pending.push_back(Sent { job, at: now });
    }

    fn answered(&mut self, sent: Sent, status: u16, seen: Option<Seen>) {
        let now = Instant::now();
        let latency = micros(sent.at, now);
        self.lane.last_latency.store(latency, Relaxed);
        let head = self
            .pending
            .front()
            .map_or(0, |s| micros(self.epoch, s.at).max(1));
        self.lane.head_sent.store(head, Relaxed);
        self.lane.outstanding.fetch_sub(1, Relaxed);
        sent.job.answered(status, seen);
    }

    /// Ends the lane: closed to new copies, then each copy it still held goes to another
    /// lane if it safely may (see the module's notes), or fails.
    fn finish(mut self, end: End) {
        self.lane.closed.store(true, Relaxed);
        self.rx.close();
        let written = self.pending.drain(..).map(|s| (s.job, true));
        let queued = std::iter::from_fn(|| self.rx.try_recv().ok()).map(|j| (j, false));
        let held: Vec<(Job, bool)> = written.chain(queued).collect();
        for (i, (mut job, written)) in held.into_iter().enumerate() {
            let again = match end {
                End::Announced => true,
                End::Polite => !written || (job.idempotent && !job.maybe_processed),
                End::Failed { .. } | End::Unreachable { .. } => false,
            };
            if again && job.handovers < MAX_HANDOVERS {
                job.handovers += 1;
                job.maybe_processed |= written && matches!(end, End::Polite);
                dispatch(&self.mirror, job);
                continue;
            }
            match end {
                End::Failed { timeout } if i == 0 => job.failed(timeout),
                End::Unreachable { timeout } if i == 0 => job.unreachable(timeout),
                End::Unreachable { .. } => job.failed_behind(),
                End::Failed { .. } => job.failed_behind(),
                _ => job.failed(false),
            }
        }
    }
}

/// Reads what is there; `Ok(None)` when nothing was (a spurious wake-up).
fn read_some(stream: &TcpStream, inb: &mut BytesMut) -> Result<Option<usize>, ()> {
    inb.reserve(16 * 1024);
    match stream.try_read_buf(inb) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(_) => Err(()),
    }
}

/// Writes as much of `out` as the socket takes now.
fn write_some(stream: &TcpStream, out: &mut BytesMut) -> Result<(), ()> {
    while !out.is_empty() {
        match stream.try_write(out) {
            Ok(0) => return Err(()),
            Ok(n) => out.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(_) => return Err(()),
        }
    }
    Ok(())
}
