//! The delivery service: a Pingora background service that takes the right to deliver from
//! the spool ([`Spool::claim`]), is handed every kept request ([`Spool::found`]) and sends
//! each to every target that does not have it yet.
//!
//! Each target has its own lane: a queue of deliveries ready to go, a heap of failed ones
//! waiting for their next attempt, and at most [`CONCURRENCY`] attempts in flight
//! ([`TOTAL_CONCURRENCY`] in all). An attempt that fails to connect, times out, or gets 408,
//! 429 or a 5xx is tried again after an exponential backoff with jitter (at least what
//! `Retry-After` asks), until `broadcast_retry.max_attempts` or `max_age` gives it up
//! (counted `expired`, logged with its request id); another 4xx is not retried (counted
//! `rejected`, logged). While a target's circuit is open its deliveries wait.
//!
//! On a graceful stop or upgrade, with a disk spool the service stops starting attempts,
//! waits a few seconds for those in flight, and hands the spool over (the next process, or
//! the `-u` successor, resumes from it; what was in flight and not finished is sent again).
//! With the memory spool it keeps delivering until nothing is left or
//! `grace_period_seconds` ends; what is left then is lost (counted `dropped`).

use parking_lot::Mutex;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::connectors::http::Connector;
use pingora_core::connectors::ConnectorOptions;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus::IntGaugeVec;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use super::spool::{Accepted, Found, Key, Spool};
use super::{age, Target, Targets};
use crate::limits::{self, Budget};
use crate::outbound::exchange::{self, Body, Failure, Keep};
use crate::upstream::Tried;

/// Attempts in flight at once per target.
const CONCURRENCY: usize = 64;
/// Attempts in flight at once in all, so hundreds of targets cannot exhaust the process's
/// sockets.
const TOTAL_CONCURRENCY: usize = 1024;
/// Requests kept in memory for their deliveries (beyond, a disk spool reads them again).
const KEEP_BYTES: usize = 64 * 1024 * 1024;
/// The first retry's delay; each further one doubles it, up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How long a stopping process waits for attempts in flight before handing over.
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// One request for one target.
struct Item {
    key: Key,
    /// The target's index in the request's list.
    index: u16,
    attempts: u32,
    accepted_ms: u64,
    size: u64,
    request_id: Arc<str>,
    /// The request, while kept in memory.
    held: Option<Held>,
}

/// A request kept in memory, counted against [`KEEP_BYTES`] until dropped (a memory
/// spool's are not counted: they are all there is).
struct Held {
    accepted: Arc<Accepted>,
    _bytes: Option<limits::Held>,
}

struct Later {
    at: Instant,
    seq: u64,
    item: Item,
}

impl PartialEq for Later {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Later {}
impl PartialOrd for Later {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Later {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<Item>,
    later: BinaryHeap<Reverse<Later>>,
    seq: u64,
    inflight: usize,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.later.is_empty() && self.inflight == 0
    }
}

/// One target's deliveries.
struct Lane {
    target: Arc<Target>,
    queue: Mutex<Queue>,
    more: Notify,
}

/// The lanes, by (route label, upstream name): what the spool knows a target by.
type Lanes = HashMap<(String, String), Arc<Lane>>;

/// Every broadcast route's targets, by route label, as reloads change them.
pub type RoutesWatch = watch::Receiver<Arc<HashMap<String, Arc<Targets>>>>;

/// What the lanes share.
struct Shared {
    spool: Arc<dyn Spool>,
    connector: Connector,
    total: Arc<Semaphore>,
    keep: Arc<Budget>,
    /// Turns true when the service is told to stop.
    stop: watch::Receiver<bool>,
}

/// The background service that delivers broadcast requests.
pub struct Deliverer {
    spool: Arc<dyn Spool>,
    routes: RoutesWatch,
    options: ConnectorOptions,
    grace: Duration,
    spool_bytes: IntGaugeVec,
    spool_oldest: IntGaugeVec,
}

impl Deliverer {
    pub fn new(
        spool: Arc<dyn Spool>,
        routes: RoutesWatch,
        conf: &ServerConf,
        spool_bytes: IntGaugeVec,
        spool_oldest: IntGaugeVec,
    ) -> Deliverer {
        Deliverer {
            spool,
            routes,
            options: ConnectorOptions::from_server_conf(conf),
            grace: Duration::from_secs(conf.grace_period_seconds.unwrap_or(0)),
            spool_bytes,
            spool_oldest,
        }
    }
}

#[async_trait]
impl BackgroundService for Deliverer {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut waiting = shutdown.clone();
        if !self.spool.claim(&mut waiting).await {
            return;
        }
        // Said only where there is something to deliver: a configuration with broadcast
        // routes (a reload that brings the first one delivers without a word).
        if self.routes.borrow().is_empty() {
            log::debug!("broadcast: delivering from the spool");
        } else {
            log::info!("broadcast: delivering from the spool");
        }
        let (stop_tx, stop) = watch::channel(false);
        let shared = Arc::new(Shared {
            spool: Arc::clone(&self.spool),
            connector: Connector::new(Some(self.options.clone())),
            total: Arc::new(Semaphore::new(TOTAL_CONCURRENCY)),
            keep: Arc::new(Budget::new(KEEP_BYTES)),
            stop,
        });
        // One lane per (route, target), found by route label and upstream name.
        let mut routes = self.routes.clone();
        let mut tasks = JoinSet::new();
        let lanes = ArcSwap::from_pointee(Lanes::new());
        follow_routes(&lanes, &routes.borrow_and_update(), &shared, &mut tasks);
        let lanes = Arc::new(lanes);
        let mut intake = tokio::spawn(intake(Arc::clone(&lanes), Arc::clone(&shared)));
        let gauges = tokio::spawn(report(
            Arc::clone(&lanes),
            Arc::clone(&self.spool),
            self.spool_bytes.clone(),
            self.spool_oldest.clone(),
        ));
        let durable = self.spool.durable();
        let mut shutdown = shutdown;
        // A disk spool is handed over as soon as the stop or upgrade is asked for (on
        // SIGQUIT Pingora itself waits 5 s before telling its services): the next process,
        // which waits for the spool, then delivers at once.
        let (mut quit, mut term) =
            match (signal(SignalKind::quit()), signal(SignalKind::terminate())) {
                (Ok(q), Ok(t)) if durable => (Some(q), Some(t)),
                _ => (None, None),
            };
        while !*shutdown.borrow() {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = signalled(&mut quit) => break,
                _ = signalled(&mut term) => break,
                changed = routes.changed() => match changed {
                    Ok(()) => follow_routes(&lanes, &routes.borrow_and_update(), &shared, &mut tasks),
                    Err(_) => { let _ = shutdown.changed().await; break; }
                },
            }
        }
        let _ = stop_tx.send(true);
        if durable {
            intake.abort();
        }
        let limit = if durable {
            HANDOVER_WAIT.min(self.grace.max(Duration::from_secs(1)))
        } else {
            self.grace
        };
        let finished =
            tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} }).await;
        tasks.abort_all();
        intake.abort();
        let _ = (&mut intake).await;
        gauges.abort();
        let lanes = lanes.load_full();
        let left: u64 = lanes
            .values()
            .map(|l| {
                let q = l.queue.lock();
                (q.ready.len() + q.later.len() + q.inflight) as u64
            })
            .sum();
        if durable {
            self.spool.release().await;
            log::info!("broadcast: spool handed over ({left} deliveries pending)");
        } else if finished.is_err() || left > 0 {
            for lane in lanes.values() {
                let q = lane.queue.lock();
                let n = (q.ready.len() + q.later.len() + q.inflight) as u64;
                if n > 0 {
                    lane.target.dropped.inc_by(n);
                }
            }
            log::warn!("broadcast: stopping with {left} deliveries undelivered and no spool: they are lost (counted as dropped)");
        }
    }
}

/// Waits for `s`, or for ever when there is none to wait for.
async fn signalled(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// Brings the lanes in step with the routes in force: a (route, target) pair that stays
/// keeps its lane and queue, a new one gets a lane, and the lane of a pair a reload
/// removed goes on delivering what it holds (those requests were accepted for that
/// target) but takes nothing new.
fn follow_routes(
    lanes: &ArcSwap<Lanes>,
    routes: &HashMap<String, Arc<Targets>>,
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
) {
    let before = lanes.load_full();
    let mut now = Lanes::new();
    for (label, targets) in routes {
        for t in &targets.list {
            let key = (label.clone(), t.name.to_string());
            let lane = match before.get(&key) {
                Some(lane) if Arc::ptr_eq(&lane.target, t) => Arc::clone(lane),
                _ => {
                    let lane = Arc::new(Lane {
                        target: Arc::clone(t),
                        queue: Mutex::default(),
                        more: Notify::new(),
                    });
                    tasks.spawn(run_lane(Arc::clone(&lane), Arc::clone(shared)));
                    lane
                }
            };
            now.insert(key, lane);
        }
    }
    let mut targets: Vec<(String, String)> = now.keys().cloned().collect();
    targets.sort();
    shared.spool.follow(&targets);
    lanes.store(Arc::new(now));
}

/// Takes what the spool hands out and queues each request on the lanes of its targets.
async fn intake(lanes: Arc<ArcSwap<Lanes>>, shared: Arc<Shared>) {
    let keep_all = !shared.spool.durable();
    loop {
        let found = shared.spool.found(Duration::from_millis(250)).await;
        let lanes = lanes.load();
        for Found {
            key,
            pending,
            size,
            accepted,
        } in found
        {
            let request_id: Arc<str> = Arc::from(accepted.request_id.as_str());
            for index in pending {
                let name = accepted.targets.get(index as usize);
                let lane = name.and_then(|n| lanes.get(&(accepted.route.clone(), n.clone())));
                let Some(lane) = lane else {
                    log::warn!(
                        "broadcast: request {} was kept for {} of route {}, which is no longer one of its targets: given up",
                        accepted.request_id,
                        name.map_or("?", |n| n.as_str()),
                        accepted.route
                    );
                    shared.spool.done(key, index);
                    continue;
                };
                let bytes = if keep_all {
                    Some(None)
                } else {
                    shared.keep.hold(size as usize).map(Some)
                };
                let held = bytes.map(|bytes| Held {
                    accepted: Arc::clone(&accepted),
                    _bytes: bytes,
                });
                let item = Item {
                    key,
                    index,
                    attempts: 0,
                    accepted_ms: accepted.accepted_ms,
                    size,
                    request_id: Arc::clone(&request_id),
                    held,
                };
                if !shared.spool.shared() {
                    lane.target.pending.fetch_add(1, Relaxed);
                    lane.target.pending_bytes.fetch_add(size, Relaxed);
                }
                lane.queue.lock().ready.push_back(item);
                lane.more.notify_one();
            }
        }
        if *shared.stop.borrow() && !keep_all {
            return;
        }
    }
}

/// Refreshes the age of each target's oldest delivery and the spool gauges once a second
/// (with a shared spool, every figure of a target from the spool's count of it).
async fn report(
    lanes: Arc<ArcSwap<Lanes>>,
    spool: Arc<dyn Spool>,
    bytes: IntGaugeVec,
    oldest: IntGaugeVec,
) {
    loop {
        let lanes = lanes.load_full();
        let mut by_upstream: HashMap<&str, (u64, u64)> = HashMap::new();
        for ((route, name), lane) in lanes.iter() {
            let counted = spool.backlog(route, name);
            if let Some(b) = counted {
                lane.target.pending.store(b.pending, Relaxed);
                lane.target.pending_bytes.store(b.bytes, Relaxed);
            }
            let first = if let Some(b) = counted {
                b.oldest_ms
            } else {
                let q = lane.queue.lock();
                q.ready
                    .iter()
                    .chain(q.later.iter().map(|l| &l.0.item))
                    .map(|i| i.accepted_ms)
                    .min()
                    .unwrap_or(0)
            };
            let t = &lane.target;
            t.oldest_ms.store(first, Relaxed);
            let e = by_upstream.entry(&*t.name).or_insert((0, 0));
            e.0 += t.pending_bytes.load(Relaxed);
            if first > 0 && (e.1 == 0 || first < e.1) {
                e.1 = first;
            }
        }
        for (upstream, (b, first)) in by_upstream {
            bytes.with_label_values(&[upstream]).set(b as i64);
            let seconds = if first > 0 { age(first).as_secs() } else { 0 };
            oldest.with_label_values(&[upstream]).set(seconds as i64);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs one target's deliveries until told to stop (with the memory spool: until nothing
/// is left), then waits for its attempts in flight.
async fn run_lane(lane: Arc<Lane>, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let mut inflight = JoinSet::new();
    let mut stop = shared.stop.clone();
    let draining = !shared.spool.durable();
    loop {
        let stopping = *stop.borrow();
        if stopping && (!draining || lane.queue.lock().is_empty()) {
            break;
        }
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let Ok(global) = Arc::clone(&shared.total).acquire_owned().await else {
            break;
        };
        // The next delivery: a ready one, else a retry whose time has come.
        let (next, wake_at) = {
            let mut q = lane.queue.lock();
            let now = Instant::now();
            let due = q.later.peek().is_some_and(|l| l.0.at <= now);
            let next = match q.ready.pop_front() {
                Some(item) => Some(item),
                None if due => q.later.pop().map(|l| l.0.item),
                None => None,
            };
            if next.is_some() {
                q.inflight += 1;
            }
            (next, q.later.peek().map(|l| l.0.at))
        };
        let Some(item) = next else {
            drop((slot, global));
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                _ = lane.more.notified() => {}
                _ = tokio::time::sleep_until(wake_at.unwrap_or(far).into()) => {}
                _ = stop.changed(), if !stopping => {}
                _ = tokio::time::sleep(Duration::from_millis(100)), if stopping => {}
            }
            continue;
        };
        // An open circuit delays the delivery; it is not lost.
        let probe = loop {
            if let Some(probe) = lane.target.breaker.admit(Instant::now()) {
                break Some(probe);
            }
            if *stop.borrow() && !draining {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let Some(probe) = probe else {
            let mut q = lane.queue.lock();
            q.inflight -= 1;
            q.ready.push_front(item);
            break;
        };
        let (lane, shared) = (Arc::clone(&lane), Arc::clone(&shared));
        inflight.spawn(async move {
            attempt(&lane, &shared, item, probe).await;
            drop((slot, global));
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

/// What became of one attempt.
enum Outcome {
    Delivered,
    /// A 4xx other than 408 and 429: the target refuses it; not tried again.
    Rejected(u16),
    /// Worth another try: why it failed, and how long the target asked to wait.
    Failed(String, Option<Duration>),
}

/// One attempt of one delivery, and what follows from it: done, or queued again.
async fn attempt(lane: &Lane, shared: &Shared, mut item: Item, probe: bool) {
    let target = &lane.target;
    let accepted = match &item.held {
        Some(h) => Ok(Arc::clone(&h.accepted)),
        None => shared.spool.load(item.key).await,
    };
    let outcome = match accepted {
        Ok(a) => send(target, &a, &shared.connector).await,
        Err(e) => {
            log::error!(
                "broadcast: request {} for {} cannot be read from the spool ({e}): lost",
                item.request_id,
                target.name
            );
            if probe {
                target.breaker.abandon_probe();
            }
            target.dropped.inc();
            finish(lane, shared, &item);
            return;
        }
    };
    target
        .breaker
        .report(!matches!(outcome, Outcome::Failed(..)), Instant::now());
    match outcome {
        Outcome::Delivered => {
            target.ok.inc();
            finish(lane, shared, &item);
        }
        Outcome::Rejected(status) => {
            target.rejected.inc();
            log::warn!(
                "broadcast: {} rejected request {} of route {} with {status}; not retried",
                target.name,
                item.request_id,
                target.route
            );
            finish(lane, shared, &item);
        }
        Outcome::Failed(why, asked) => {
            target.error.inc();
            item.attempts += 1;
            let age = age(item.accepted_ms);
            let delay = backoff(item.attempts).max(asked.unwrap_or_default());
            let destination = target.destination();
            let retry = &destination.retry;
            if item.attempts >= retry.max_attempts || age + delay > retry.max_age {
                target.expired.inc();
                log::warn!(
                    "broadcast: gave up request {} for {} of route {} after {} attempts over {}s: {why}",
                    item.request_id,
                    target.name,
                    target.route,
                    item.attempts,
                    age.as_secs()
                );
                *target.last_error.lock() = Some(why);
                finish(lane, shared, &item);
                return;
            }
            target.retried.inc();
            *target.last_error.lock() = Some(why);
            if shared.spool.durable() {
                // It waits anyway: let its memory go (it is read again when due).
                item.held = None;
            }
            let mut q = lane.queue.lock();
            q.inflight -= 1;
            q.seq += 1;
            let seq = q.seq;
            q.later.push(Reverse(Later {
                at: Instant::now() + delay,
                seq,
                item,
            }));
            drop(q);
            lane.more.notify_one();
        }
    }
}

/// The delivery is over for this target: the spool forgets it once all targets are done.
fn finish(lane: &Lane, shared: &Shared, item: &Item) {
    shared.spool.done(item.key, item.index);
    if !shared.spool.shared() {
        lane.target.pending.fetch_sub(1, Relaxed);
        lane.target.pending_bytes.fetch_sub(item.size, Relaxed);
    }
    let mut q = lane.queue.lock();
    q.inflight -= 1;
}

/// Sends the request to one backend of the target upstream.
async fn send(target: &Target, a: &Accepted, connector: &Connector) -> Outcome {
    let destination = target.destination();
    // Under the target's concurrency limit, a delivery waits behind client requests.
    let slot = match &destination.upstream.concurrency {
        Some(limiter) => limiter.acquire_background().await,
        None => None,
    };
    let Some(mut lease) = destination.upstream.select(b"", &Tried::default()) else {
        return Outcome::Failed("no healthy backend".into(), None);
    };
    lease.hold(slot);
    // A traced request's delivery attempt is a span of its trace, however late it comes.
    let span = crate::observe::span::delivery_span(&a.header.headers, "broadcast delivery");
    let t = &destination.upstream.config.timeouts;
    let body = Body::Full(a.body.clone());
    let mut header = match &destination.path {
        None => std::borrow::Cow::Borrowed(&a.header),
        Some(path) => {
            let mut header = a.header.clone();
            if let Err(e) = header.set_raw_path(path.as_bytes()) {
                return Outcome::Failed(format!("target path {path}: {e}"), None);
            }
            std::borrow::Cow::Owned(header)
        }
    };
    if let Some(span) = span {
        let traceparent = span.traceparent().header_value();
        let _ = header
            .to_mut()
            .insert_header(crate::http::trace_context::TRACEPARENT, traceparent);
        lease.trace(span);
    }
    let answer = exchange::exchange(
        connector,
        &mut lease,
        t,
        t.total(),
        &header,
        body,
        Keep::Discard,
    );
    match answer.await {
        Ok(answer) => match answer.status {
            408 | 429 | 500..=599 => {
                Outcome::Failed(format!("answered {}", answer.status), answer.retry_after)
            }
            400..=499 => Outcome::Rejected(answer.status),
            _ => Outcome::Delivered,
        },
        Err(Failure::Timeout) => Outcome::Failed("timed out".into(), None),
        Err(Failure::Upstream(e)) => Outcome::Failed(e.to_string().trim().to_string(), None),
        Err(f) => Outcome::Failed(format!("{f:?}"), None),
    }
}

/// The wait before attempt `n + 1`: 0.5 s doubled for each failure, at most 5 min, with
/// "equal jitter" (between half of it and all of it) so that retries do not come in waves.
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let full = exp.min(BACKOFF_MAX);
    let half = full / 2;
    half + half.mul_f64(crate::http::request_id::unit_random())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap() {
        for n in 1..30 {
            let d = backoff(n);
            let full = BACKOFF_BASE
                .saturating_mul(1u32 << (n - 1).min(20))
                .min(BACKOFF_MAX);
            assert!(d >= full / 2 && d <= full, "{n}: {d:?} vs {full:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(500));
        assert!(backoff(40) >= Duration::from_secs(150));
    }
}
