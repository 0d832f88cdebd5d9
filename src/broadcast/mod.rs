//! Broadcast routes (`broadcast: [a, b, ...]`): the gateway reads the request (body limit
//! applies), keeps it in the spool ([`spool`]: on disk, in memory, or in Redis Streams
//! shared by every instance, [`redis`]), and
//! answers `202 Accepted` with `{"request_id", "targets"}` once it is kept; a full spool
//! answers 503 with `Retry-After`. The delivery service ([`deliver`]) then sends it to one
//! backend of every listed upstream, retrying failed attempts with backoff until
//! `broadcast_retry` gives up, and survives stops, upgrades and crashes with a disk spool.
//!
//! Each (route, target) pair has its own circuit breaker (5 consecutive failures open it for
//! 10 s, doubling to 5 min; an open circuit delays deliveries, never drops them), on top of
//! the target upstream's own balancing, health checks and backend breakers.

mod deliver;
pub mod disk;
pub mod redis;
pub mod spool;

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use prometheus::IntCounter;

use crate::config::{BreakerConfig, RetryPolicy, RouteConfig};
use crate::http::forwarding;
use crate::http::passage::Passage;
use crate::http::request_id;
use crate::http::respond::send_error;
use crate::limits::Refusal;
use crate::observe::metrics::Metrics;
use crate::upstream::breaker::Breaker;
use crate::upstream::Upstream;
pub use deliver::{Deliverer, RoutesWatch};
use spool::{Accepted, PutError, Spool};

/// The header that lets a target drop a delivery it already has.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Where a target's deliveries go under the configuration in force.
pub struct Destination {
    pub upstream: Arc<Upstream>,
    /// Deliveries go to this path (and query) instead of the request's own.
    pub path: Option<String>,
    pub retry: RetryPolicy,
}

/// One upstream of one broadcast route: its breaker, its outcome counters, and what waits
/// for it (for `/status` and the spool gauges). It is the same value for as long as the
/// route (by label) lists the upstream (by name): a reload hands it its new
/// [`Destination`] and keeps its queue, circuit and counts.
pub struct Target {
    /// The upstream's name: with the route's label, what the spool knows the target by.
    pub name: Arc<str>,
    destination: ArcSwap<Destination>,
    route: String,
    breaker: Breaker,
    ok: IntCounter,
    error: IntCounter,
    retried: IntCounter,
    rejected: IntCounter,
    expired: IntCounter,
    dropped: IntCounter,
    /// Deliveries waiting or in flight, their bytes, and the oldest one's accept time.
    pub pending: AtomicU64,
    pub pending_bytes: AtomicU64,
    pub oldest_ms: AtomicU64,
    /// Why the last failed attempt failed.
    pub last_error: Mutex<Option<String>>,
}

/// The targets of one broadcast route.
pub struct Targets {
    pub list: Vec<Arc<Target>>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long ago `ms` (milliseconds since the epoch) was.
pub fn age(ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ms))
}

/// Accepts a request on a broadcast route: reads its body within the route's
/// `max_body_bytes` (413 past it), keeps it in the spool for every target and answers
/// `202 {"request_id", "targets"}` — or 503 with `Retry-After` when the spool is full or
/// cannot be written. `closing`: the process is draining, so the answer closes the
/// connection.
pub async fn accept(
    session: &mut Session,
    route: &RouteConfig,
    targets: &Targets,
    spool: &dyn Spool,
    pass: &Passage,
    request_id: &str,
    closing: bool,
) -> Result<()> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if (body.len() + chunk.len()) as u64 > route.max_body_bytes {
            let r = Refusal::TooLarge;
            return send_error(
                session,
                r.status(),
                r.message(),
                request_id,
                Vec::new(),
                true,
            )
            .await;
        }
        body.extend_from_slice(&chunk);
    }
    let body = body.freeze();
    let mut header = session.req_header().clone();
    forwarding::broadcast_request(&mut header, route, pass, request_id, body.len())?;
    if !header.headers.contains_key(IDEMPOTENCY_KEY) {
        header.insert_header(IDEMPOTENCY_KEY, request_id::generate())?;
    }
    let accepted = Arc::new(Accepted {
        route: route.label.clone(),
        targets: targets.list.iter().map(|t| t.name.to_string()).collect(),
        request_id: request_id.to_string(),
        accepted_ms: now_ms(),
        header,
        body,
    });
    let refused = match spool.put(accepted).await {
        Ok(()) => None,
        Err(PutError::Full) => Some("broadcast spool is full"),
        Err(PutError::Io(e)) => {
            log::error!("broadcast: cannot keep request {request_id} in the spool: {e}");
            Some("broadcast spool cannot be written")
        }
        Err(PutError::Unavailable(_)) => Some("broadcast spool is unavailable"),
    };
    if let Some(message) = refused {
        // Push back rather than accept what might not be delivered.
        let retry = vec![(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        )];
        return send_error(session, 503, message, request_id, retry, closing).await;
    }
    let answer =
        serde_json::json!({ "request_id": request_id, "targets": targets.list.len() }).to_string();
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

/// Builds the targets of one route. A target `previous` (the route's targets under the
/// configuration being replaced) has for the same upstream is kept, with its new
/// destination.
pub fn targets(
    route: &str,
    upstreams: &[(Arc<Upstream>, Option<String>)],
    retry: RetryPolicy,
    metrics: &Metrics,
    previous: Option<&Targets>,
) -> Targets {
    let breaker = BreakerConfig {
        failures: 5,
        open: Duration::from_secs(10),
        max_open: Duration::from_secs(300),
        connect_only: false,
    };
    let list = upstreams
        .iter()
        .map(|(u, path)| {
            let destination = Destination {
                upstream: Arc::clone(u),
                path: path.clone(),
                retry,
            };
            let kept = previous.and_then(|p| p.list.iter().find(|t| *t.name == *u.name()));
            if let Some(t) = kept {
                t.destination.store(Arc::new(destination));
                return Arc::clone(t);
            }
            let count = |o: &str| {
                metrics
                    .broadcast_deliveries
                    .with_label_values(&[route, u.name(), o])
            };
            Arc::new(Target {
                name: Arc::clone(&u.name),
                destination: ArcSwap::from_pointee(destination),
                route: route.to_string(),
                breaker: Breaker::new(&breaker),
                ok: count("ok"),
                error: count("error"),
                retried: count("retried"),
                rejected: count("rejected"),
                expired: count("expired"),
                dropped: count("dropped"),
                pending: AtomicU64::new(0),
                pending_bytes: AtomicU64::new(0),
                oldest_ms: AtomicU64::new(0),
                last_error: Mutex::new(None),
            })
        })
        .collect();
    Targets { list }
}

impl Target {
    /// Where its deliveries go now.
    pub fn destination(&self) -> Arc<Destination> {
        self.destination.load_full()
    }

    /// What `/status` shows of it.
    pub fn status(&self) -> serde_json::Value {
        let oldest = self.oldest_ms.load(Relaxed);
        serde_json::json!({
            "upstream": &*self.name,
            "pending": self.pending.load(Relaxed),
            "pending_bytes": self.pending_bytes.load(Relaxed),
            "oldest_seconds": (oldest > 0).then(|| age(oldest).as_secs()),
            "last_error": self.last_error.lock().clone(),
        })
    }
}
