//! Broadcast routes (`broadcast: [a, b, ...]`): the gateway reads the request (body limit
//! applies), answers `202 Accepted` with `{"request_id", "targets"}` at once, and delivers
//! a copy to one backend of every listed upstream in the background.
//!
//! Each (route, target) pair has its own bounded queue — at most [`QUEUE`] deliveries and
//! [`QUEUE_BYTES`] of them (heads and bodies, from acceptance until delivered or given
//! up); a full queue drops the delivery and counts it — and its own circuit breaker (5 consecutive failures open it for 10 s,
//! doubling to 5 min), on top of the target upstream's own balancing, health checks and
//! backend breakers. One body is shared by all targets. Deliveries go out through
//! Pingora's HTTP connector and its keep-alive pool, a bounded number at once per target.
//!
//! Delivery runs as a Pingora background service: on a graceful stop or upgrade it keeps
//! delivering what was accepted until the queues are empty or `grace_period_seconds`
//! ends; what it had to give up is logged and counted as `dropped`.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::connectors::ConnectorOptions;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_http::RequestHeader;

use prometheus::IntCounter;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::config::{BreakerConfig, RouteConfig};
use crate::forwarding;
use crate::limits::{ByteBudget, Refusal};
use crate::metrics::Metrics;
use crate::outbound::{self, Body, Keep};
use crate::request_id;
use crate::respond::send_error;
use crate::upstream::breaker::Breaker;
use crate::upstream::{Tried, Upstream};
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// Deliveries that may wait per target before new ones are dropped.
pub const QUEUE: usize = 1024;
/// Bytes of deliveries one target may hold, queued or in flight.
pub const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// Deliveries in flight at once per target.
const CONCURRENCY: usize = 64;
/// Deliveries in flight at once in all, so hundreds of targets cannot exhaust the
/// process's sockets.
const TOTAL_CONCURRENCY: usize = 1024;

/// One accepted request, shared by all its targets.
pub struct Delivery {
    pub header: RequestHeader,
    pub body: Bytes,
}

impl Delivery {
    /// What one delivery holds, counted against each of its targets' byte bound.
    fn size(&self) -> usize {
        let head: usize = self
            .header
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        std::mem::size_of::<Delivery>() + head + self.header.raw_path().len() + self.body.len()
    }
}

/// One upstream of one broadcast route.
pub struct Target {
    upstream: Arc<Upstream>,
    queue: mpsc::Sender<Arc<Delivery>>,
    bytes: ByteBudget,
    breaker: Breaker,
    ok: IntCounter,
    error: IntCounter,
    dropped: IntCounter,
}

impl Target {}

/// Queues one accepted request for every target, without waiting. `None`: no target had
/// room, so nothing was accepted (the client is told to retry). Otherwise the number of
/// targets it was queued for; the targets whose queue was full count it as dropped.
pub fn offer(targets: &[Arc<Target>], d: &Arc<Delivery>) -> Option<usize> {
    let size = d.size();
    let slots: Vec<_> = targets
        .iter()
        .map(|t| {
            let slot = t.queue.try_reserve().ok()?;
            t.bytes.try_take(size).then_some(slot)
        })
        .collect();
    if slots.iter().all(Option::is_none) {
        return None;
    }
    let mut queued = 0;
    for (target, slot) in targets.iter().zip(slots) {
        match slot {
            Some(slot) => {
                slot.send(Arc::clone(d));
                queued += 1;
            }
            None => target.dropped.inc(),
        }
    }
    Some(queued)
}

/// Accepts a request on a broadcast route: reads its body within the route's
/// `max_body_bytes` (413 past it), queues one delivery for every target and answers
/// `202 {"request_id", "targets"}` at once — or 503 with `Retry-After` when no target has
/// room. `closing`: the process is draining, so the answer closes the connection.
pub async fn accept(
    session: &mut Session,
    route: &RouteConfig,
    targets: &[Arc<Target>],
    request_id: &str,
    closing: bool,
) -> Result<()> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if (body.len() + chunk.len()) as u64 > route.max_body_bytes {
            let r = Refusal::TooLarge;
            return send_error(session, r.status(), r.message(), request_id, &[], true).await;
        }
        body.extend_from_slice(&chunk);
    }
    let body = body.freeze();
    let mut header = session.req_header().clone();
    forwarding::broadcast_request(
        &mut header,
        route,
        forwarding::client(session),
        request_id,
        body.len(),
    )?;
    let delivery = Arc::new(Delivery { header, body });
    if offer(targets, &delivery).is_none() {
        // Every queue is full: push back rather than accept what cannot be delivered.
        let retry = [("retry-after", "1".to_string())];
        return send_error(
            session,
            503,
            "broadcast queues are full",
            request_id,
            &retry,
            closing,
        )
        .await;
    }
    let answer =
        serde_json::json!({ "request_id": request_id, "targets": targets.len() }).to_string();
    let mut resp = ResponseHeader::build(202, Some(4))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", answer.len().to_string())?;
    resp.insert_header(request_id::HEADER, request_id)?;
    if closing {
        session.as_downstream_mut().set_keepalive(None);
        resp.insert_header(http::header::CONNECTION, "close")?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(answer)), true)
        .await
}

/// The receiving ends of every target's queue, handed to the delivery service at start.
pub type Queues = Vec<(Arc<Target>, mpsc::Receiver<Arc<Delivery>>)>;

/// Builds the targets of one route, adding their queues' receiving ends to `queues`.
pub fn targets(
    route: &str,
    upstreams: &[Arc<Upstream>],
    metrics: &Metrics,
    queues: &mut Queues,
) -> Vec<Arc<Target>> {
    let breaker = BreakerConfig {
        failures: 5,
        open: Duration::from_secs(10),
        max_open: Duration::from_secs(300),
    };
    upstreams
        .iter()
        .map(|u| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let count = |o: &str| {
                metrics
                    .broadcast_deliveries
                    .with_label_values(&[route, u.name(), o])
            };
            let target = Arc::new(Target {
                upstream: Arc::clone(u),
                queue: tx,
                bytes: ByteBudget::new(QUEUE_BYTES),
                breaker: Breaker::new(&breaker),
                ok: count("ok"),
                error: count("error"),
                dropped: count("dropped"),
            });
            queues.push((Arc::clone(&target), rx));
            target
        })
        .collect()
}

/// The background service that delivers broadcast copies.
pub struct Deliverer {
    queues: Mutex<Queues>,
    options: ConnectorOptions,
    grace: Duration,
}

impl Deliverer {
    pub fn new(queues: Queues, conf: &ServerConf) -> Deliverer {
        Deliverer {
            queues: Mutex::new(queues),
            options: ConnectorOptions::from_server_conf(conf),
            grace: Duration::from_secs(conf.grace_period_seconds.unwrap_or(0)),
        }
    }
}

/// Tells the dispatchers to finish: drain what is queued, then stop.
#[derive(Default)]
struct Stop {
    stopping: AtomicBool,
    notify: Notify,
}

#[async_trait]
impl BackgroundService for Deliverer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap_or_else(|p| p.into_inner()));
        if queues.is_empty() {
            return;
        }
        let connector = Arc::new(Connector::new(Some(self.options.clone())));
        let stop = Arc::new(Stop::default());
        let total = Arc::new(Semaphore::new(TOTAL_CONCURRENCY));
        let mut dispatchers = JoinSet::new();
        for (target, rx) in queues {
            let shared = (
                Arc::clone(&connector),
                Arc::clone(&stop),
                Arc::clone(&total),
            );
            dispatchers.spawn(dispatch(target, rx, shared));
        }
        let _ = shutdown.changed().await;
        stop.stopping.store(true, Relaxed);
        stop.notify.notify_waiters();
        let drained = tokio::time::timeout(self.grace, async {
            while dispatchers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            dispatchers.abort_all();
            log::warn!("broadcast: grace period over, giving up the deliveries still queued (counted as dropped)");
        }
    }
}

/// Delivers one target's queue, at most `CONCURRENCY` at once, until told to stop; then
/// delivers what is still queued and returns. Whatever is left when the task is aborted is
/// counted as dropped.
async fn dispatch(
    target: Arc<Target>,
    mut rx: mpsc::Receiver<Arc<Delivery>>,
    (connector, stop, total): (Arc<Connector>, Arc<Stop>, Arc<Semaphore>),
) {
    struct CountLeft<'a>(&'a Target, &'a mut mpsc::Receiver<Arc<Delivery>>);
    impl Drop for CountLeft<'_> {
        fn drop(&mut self) {
            let left = self.1.len() as u64;
            if left > 0 {
                self.0.dropped.inc_by(left);
                log::warn!(
                    "broadcast to {}: {left} deliveries given up",
                    self.0.upstream.name()
                );
            }
        }
    }
    let guard = CountLeft(&target, &mut rx);
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let mut inflight = JoinSet::new();
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let Ok(global) = Arc::clone(&total).acquire_owned().await else {
            break;
        };
        let next = if stop.stopping.load(Relaxed) {
            guard.1.try_recv().ok()
        } else {
            tokio::select! {
                d = guard.1.recv() => d,
                _ = stop.notify.notified() => guard.1.try_recv().ok(),
            }
        };
        let Some(delivery) = next else { break };
        let (t, c) = (Arc::clone(&target), Arc::clone(&connector));
        inflight.spawn(async move {
            deliver(&t, &delivery, &c).await;
            t.bytes.give_back(delivery.size());
            drop((slot, global));
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

/// Sends one copy to one backend of the target upstream and counts the outcome.
async fn deliver(target: &Target, d: &Delivery, connector: &Connector) {
    let now = Instant::now();
    if target.breaker.admit(now).is_none() {
        target.error.inc();
        return;
    }
    let Some(mut lease) = target.upstream.select(b"", &Tried::default()) else {
        target.error.inc();
        target.breaker.report(false, now);
        return;
    };
    let t = &target.upstream.config.timeouts;
    let body = Body::Full(d.body.clone());
    let answer = outbound::exchange(
        connector,
        &mut lease,
        t,
        t.total(),
        &d.header,
        body,
        Keep::Discard,
    );
    let success = answer.await.is_ok_and(|a| a.status < 500);
    if success { &target.ok } else { &target.error }.inc();
    target.breaker.report(success, Instant::now());
}
