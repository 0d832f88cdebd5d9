//! Upstreams: the backends of each `upstreams:` entry, their live state (health, circuit,
//! in-flight requests) and the one place that picks a backend for a request,
//! [`Upstream::select`].
//!
//! A backend's state lives in a [`BackendState`] shared by the balancer, the active health
//! checker ([`health`]), the passive circuit breaker ([`breaker`]) and the admin endpoints.
//! A request holds a [`Lease`] on its backend: it raises the in-flight count while alive,
//! carries the attempt's result to the outcome counters and the breaker, and is dropped on
//! every path (answer, error, retry, client gone), which releases the slot.
//!
//! The backends of an upstream are one [`BackendSet`] (with the balancer built over it),
//! swapped whole when DNS discovery ([`discovery`]) finds other addresses: a backend that
//! stays keeps its state (in-flight count, circuit, health), one that leaves drains (its
//! leases hold it until their requests end), one that arrives waits for its health checks.

pub mod balance;
pub mod breaker;
pub mod budget;
pub mod concurrency;
pub mod discovery;
pub mod eyeballs;
pub mod follow;
pub mod health;
pub(crate) mod sticky;

use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use log::info;

use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use prometheus::{IntCounter, IntGauge};

use crate::config::units::show_duration;
use crate::config::{
    BackendConfig, Balance, DnsBackend, HostHeader, Protocol, ResolvesTo, UpstreamConfig,
};
use crate::http::client::Client;
use crate::keys;
use crate::observe::metrics::Metrics;
use balance::{Balancer, Candidate};
use breaker::{Attempt, Breaker, Circuit, Transition};

/// Outcome counters of one backend, resolved once so the request path formats no labels.
pub struct Outcomes {
    pub ok: IntCounter,
    pub error: IntCounter,
    pub timeout: IntCounter,
}

/// Why an attempt got no answer from a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The connection was refused or could not be made.
    Connect = 0,
    /// Connecting took longer than `timeouts.connect`.
    ConnectTimeout = 1,
    /// Connected, but the answer took longer than `timeouts.read` (or a write `write`).
    Timeout = 2,
    /// Connected, then the connection broke (reset, closed early, malformed answer).
    Broken = 3,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 4] = [
        ErrorKind::Connect,
        ErrorKind::ConnectTimeout,
        ErrorKind::Timeout,
        ErrorKind::Broken,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Broken => "broken",
        }
    }
}

/// One active health check's result.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// Why it failed; `None`: it passed.
    pub failure: Option<String>,
    pub latency: Duration,
    pub at: std::time::SystemTime,
}

impl Learned {
    /// Answers by status class (2xx, 3xx, 4xx, 5xx).
    pub fn classes(&self) -> [u64; 4] {
        [0, 1, 2, 3].map(|i| self.classes[i].load(Relaxed))
    }

    /// Attempts that got no answer, by kind, in [`ErrorKind::ALL`]'s order.
    pub fn errors(&self) -> [u64; 4] {
        [0, 1, 2, 3].map(|i| self.errors[i].load(Relaxed))
    }

    /// When its health last changed, if it did since the process started.
    pub fn health_since(&self) -> Option<std::time::SystemTime> {
        match self.health_since_ms.load(Relaxed) {
            0 => None,
            ms => Some(std::time::UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    pub fn last_check(&self) -> Option<CheckResult> {
        self.last_check.lock().clone()
    }

    pub fn record_check(&self, result: CheckResult) {
        *self.last_check.lock() = Some(result);
    }
}

/// What a backend has learned from traffic and health checks. A reload that keeps the
/// backend (same upstream, same address) hands this to the backend's new state, so its
/// health, streaks and in-flight count carry over while requests on the old state finish.
#[derive(Default)]
pub struct Learned {
    healthy: AtomicBool,
    inflight: AtomicUsize,
    /// What an operator made of it (`POST /upstreams/NAME/backends/ADDRESS/ACTION`): kept
    /// with the rest across a reload.
    mark: AtomicU8,
    /// Bumped by `disable`: pooled connections made before it are never used again.
    pool_epoch: AtomicU64,
    /// Answers by status class: 2xx, 3xx, 4xx, 5xx.
    classes: [AtomicU64; 4],
    /// Attempts that got no answer, by [`ErrorKind`].
    errors: [AtomicU64; 4],
    /// When its health last changed, in milliseconds since the Unix epoch (0: not since
    /// the process started).
    health_since_ms: AtomicU64,
    /// The last active health check's result.
    last_check: parking_lot::Mutex<Option<CheckResult>>,
    /// Consecutive passed and failed health checks.
    pub successes: AtomicU32,
    pub failures: AtomicU32,
}

/// What an operator made of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mark {
    /// Chosen as usual.
    Active = 0,
    /// Out of new choices; its requests in flight finish.
    Draining = 1,
    /// Out of new choices, its pooled connections left unused.
    Disabled = 2,
}

impl Mark {
    pub fn name(self) -> &'static str {
        match self {
            Mark::Active => "active",
            Mark::Draining => "draining",
            Mark::Disabled => "disabled",
        }
    }
}

pub struct BackendState {
    pub addr: SocketAddr,
    /// `IP:PORT`, the `backend` label of metrics and logs.
    pub label: Arc<str>,
    /// `name:`, shown beside the address in `/status`, the dashboard and logs.
    pub name: Option<Arc<str>>,
    pub weight: u32,
    /// The name it was written with or found under (SNI, health checks' Host).
    pub host: Option<String>,
    /// Where it came from: `static` (written in the file) or `dns:NAME`.
    pub source: Arc<str>,
    learned: Arc<Learned>,
    /// Kept across a reload unless the upstream's `breaker:` changed.
    breaker: Option<Arc<Breaker>>,
    /// Connection settings (timeouts, keep-alive) cloned for each request.
    peer: HttpPeer,
    /// The `Host` its requests get instead of the client's (`host_header:`).
    host_header: Option<http::HeaderValue>,
    /// A backend written by name: every address the name resolves to, tried in turn
    /// (its peers connect through them). `None`: its one address.
    pub addresses: Option<Arc<eyeballs::ResolvedAddresses>>,
    pub outcomes: Outcomes,
    /// Its id in `sticky:` cookies ([`sticky::backend_id`]).
    pub sticky_id: u64,
}

impl BackendState {
    pub fn healthy(&self) -> bool {
        self.learned.healthy.load(Relaxed)
    }

    pub fn inflight(&self) -> usize {
        self.learned.inflight.load(Relaxed)
    }

    pub fn learned(&self) -> &Learned {
        &self.learned
    }

    pub fn circuit(&self, now: Instant) -> Circuit {
        self.breaker
            .as_ref()
            .map_or(Circuit::Closed, |b| b.circuit(now))
    }

    /// Whether new requests may be sent here now: healthy, not drained or disabled, and its
    /// circuit lets them.
    pub fn available(&self, now: Instant) -> bool {
        self.healthy()
            && self.mark() == Mark::Active
            && self.breaker.as_ref().is_none_or(|b| b.allows(now))
    }

    /// What an operator made of it.
    pub fn mark(&self) -> Mark {
        match self.learned.mark.load(Relaxed) {
            1 => Mark::Draining,
            2 => Mark::Disabled,
            _ => Mark::Active,
        }
    }

    /// Drains, disables or enables it; `disable` also leaves its pooled connections unused
    /// (they close when idle).
    pub fn set_mark(&self, mark: Mark) {
        if mark == Mark::Disabled {
            self.learned.pool_epoch.fetch_add(1, Relaxed);
        }
        self.learned.mark.store(mark as u8, Relaxed);
    }

    /// A fresh peer for one request to this backend.
    pub fn peer(&self) -> Box<HttpPeer> {
        let mut peer = Box::new(self.peer.clone());
        let epoch = self.learned.pool_epoch.load(Relaxed);
        if epoch != 0 {
            // Another pool key: connections pooled before a `disable` are not reused.
            peer.group_key ^= epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        peer
    }

    /// How logs and the dashboard name it: `name (IP:PORT)`, or the address alone.
    pub fn shown(&self) -> String {
        match &self.name {
            Some(n) => format!("{n} ({})", self.label),
            None => self.label.to_string(),
        }
    }

    /// Whether its requests get a `Host` of their own (`host_header:` not `pass`).
    pub fn has_own_host(&self) -> bool {
        self.host_header.is_some()
    }

    /// Gives `req` the `Host` this backend is to get, where `host_header:` says it gets
    /// its own; an absolute URI (an h2 client's) gets the same authority.
    pub fn set_host(&self, req: &mut pingora_http::RequestHeader) -> pingora_error::Result<()> {
        let Some(host) = &self.host_header else {
            return Ok(());
        };
        req.insert_header(http::header::HOST, host.clone())?;
        if req.uri.authority().is_some() {
            let mut parts = req.uri.clone().into_parts();
            parts.authority = host.to_str().ok().and_then(|h| h.parse().ok());
            if let Ok(uri) = http::Uri::from_parts(parts) {
                req.set_uri(uri);
            }
        }
        Ok(())
    }
}

/// The `Host` a backend of `config` gets, if not the client's.
fn host_header(config: &UpstreamConfig, b: &BackendConfig) -> Option<http::HeaderValue> {
    match &config.host_header {
        HostHeader::Pass => None,
        HostHeader::Literal(v) => Some(v.clone()),
        HostHeader::Backend => {
            let name = match (&b.host, b.addr) {
                (Some(h), _) => h.clone(),
                (None, SocketAddr::V6(a)) => format!("[{}]", a.ip()),
                (None, SocketAddr::V4(a)) => a.ip().to_string(),
            };
            let default_port = if config.tls.is_some() { 443 } else { 80 };
            let text = match b.addr.port() == default_port {
                true => name,
                false => format!("{name}:{}", b.addr.port()),
            };
            http::HeaderValue::from_str(&text).ok()
        }
    }
}

impl Candidate for Arc<BackendState> {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn inflight(&self) -> usize {
        BackendState::inflight(self)
    }
}

/// One attempt in flight on a backend. It counts in the backend's in-flight load until
/// dropped, and reports the attempt's result (first report wins) to the outcome counters
/// and the circuit breaker.
pub struct Lease {
    upstream: Arc<Upstream>,
    backend: Arc<BackendState>,
    /// Its index in the set it was chosen from (for [`Tried`] and the mirror's lanes).
    index: usize,
    /// This attempt is the probe of an open circuit.
    probe: bool,
    reported: bool,
    /// When the attempt started, on an upstream with a concurrency limit (its latency is
    /// the limit's signal).
    since: Option<Instant>,
    /// The concurrency slot of a copy (mirror, fallback, delivery), held as long as it.
    held: Option<concurrency::Permit>,
    /// The attempt's span, on a traced request: its outcome is noted, and it ends with
    /// the lease.
    span: Option<crate::observe::span::Span>,
}

impl Lease {
    pub fn backend(&self) -> &BackendState {
        &self.backend
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Records this attempt as `span` (named after the backend, its outcome noted).
    pub fn trace(&mut self, mut span: crate::observe::span::Span) {
        span.attr("fanout.upstream", self.upstream.name().to_string());
        span.attr("server.address", self.backend.label.to_string());
        self.span = Some(span);
    }

    /// The attempt's span, on a traced request.
    pub fn span_id(&self) -> Option<[u8; 8]> {
        self.span.as_ref().map(crate::observe::span::Span::span_id)
    }

    fn note(&mut self, outcome: Result<u16, &'static str>) {
        if let Some(span) = &mut self.span {
            match outcome {
                Ok(status) => {
                    span.attr("http.response.status_code", i64::from(status));
                    if status >= 500 {
                        span.fail(format!("answered {status}"));
                    }
                }
                Err(why) => span.fail(why),
            }
        }
    }

    /// Holds a concurrency slot as long as this attempt.
    pub fn hold(&mut self, permit: Option<concurrency::Permit>) {
        self.held = permit;
    }

    /// Tells the upstream's concurrency limit how long the attempt took.
    fn sample(&self, timed_out: bool) {
        if let (Some(since), Some(limiter)) = (self.since, &self.upstream.concurrency) {
            limiter.sample(since, timed_out);
        }
    }

    /// The backend answered; a 5xx answer counts as a failure.
    pub fn answered(&mut self, status: u16) {
        let failed = status >= 500;
        if !failed && !self.reported {
            self.sample(false);
        }
        self.note(Ok(status));
        if let Some(class) = (status / 100).checked_sub(2).filter(|c| *c < 4) {
            self.backend().learned.classes[usize::from(class)].fetch_add(1, Relaxed);
        }
        let o = &self.backend().outcomes;
        if failed { &o.error } else { &o.ok }.inc();
        self.report(if failed { Attempt::Failed } else { Attempt::Ok });
    }

    /// The attempt failed without an answer after reaching the backend (reset, timeout).
    pub fn failed(&mut self, timeout: bool) {
        if timeout && !self.reported {
            self.sample(true);
        }
        self.note(Err(if timeout { "timed out" } else { "failed" }));
        self.count_error(match timeout {
            true => ErrorKind::Timeout,
            false => ErrorKind::Broken,
        });
        let o = &self.backend().outcomes;
        if timeout { &o.timeout } else { &o.error }.inc();
        self.report(Attempt::Failed);
    }

    /// The backend could not be reached (connect refused, timed out, no route).
    pub fn unreachable(&mut self, timeout: bool) {
        self.note(Err("could not connect"));
        self.count_error(match timeout {
            true => ErrorKind::ConnectTimeout,
            false => ErrorKind::Connect,
        });
        let o = &self.backend().outcomes;
        if timeout { &o.timeout } else { &o.error }.inc();
        self.report(Attempt::Unreachable);
    }

    /// [`Self::unreachable`] or [`Self::failed`], as the error says.
    pub fn failed_with(&mut self, e: &pingora_error::Error) {
        let timeout = crate::http::errors::is_timeout(e);
        if crate::http::errors::is_connect(e) {
            self.unreachable(timeout)
        } else {
            self.failed(timeout)
        }
    }

    /// Counted as the outcome counters are: once per call.
    fn count_error(&self, kind: ErrorKind) {
        self.backend().learned.errors[kind as usize].fetch_add(1, Relaxed);
    }

    fn report(&mut self, attempt: Attempt) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        if let Some(b) = &self.backend().breaker {
            let transition = b.report_attempt(attempt, Instant::now());
            if transition != Transition::None {
                self.upstream.refresh_soon();
                self.log(transition, b);
            }
        }
    }

    /// One line per change of a backend's state, not one per failed request.
    fn log(&self, transition: Transition, b: &Breaker) {
        let (upstream, backend) = (self.upstream.name(), self.backend.shown());
        match transition {
            Transition::Opened(until) if self.probe => log::warn!(
                "upstream {upstream}: backend {backend} taken out for {} (its probe failed)",
                show_duration(until.saturating_duration_since(Instant::now())),
            ),
            Transition::Opened(until) => {
                log::warn!(
                "upstream {upstream}: backend {backend} taken out for {} ({} failures in a row{})",
                show_duration(until.saturating_duration_since(Instant::now())),
                b.threshold(),
                if b.connect_only() { ", could not connect" } else { "" },
            )
            }
            Transition::Closed => log::warn!("upstream {upstream}: backend {backend} is back"),
            Transition::None => {}
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let backend = &self.backend;
        backend.learned.inflight.fetch_sub(1, Relaxed);
        if self.probe && !self.reported {
            if let Some(b) = &backend.breaker {
                b.abandon_probe();
            }
        }
    }
}

/// Backends a request already tried (its retries avoid them while others remain), by
/// index in the set they were chosen from: should DNS change the set between two attempts,
/// a retry may go to a backend it tried (rare, and harmless).
#[derive(Debug, Default, Clone)]
pub struct Tried {
    /// Backends 0..128 as bits: no allocation for the usual upstream.
    first: u128,
    /// Indices from 128 on, for very large upstreams.
    rest: Vec<usize>,
}

impl Tried {
    pub fn add(&mut self, i: usize) {
        if i < 128 {
            self.first |= 1 << i;
        } else if !self.rest.contains(&i) {
            self.rest.push(i);
        }
    }
    pub fn contains(&self, i: usize) -> bool {
        if i < 128 {
            self.first & (1 << i) != 0
        } else {
            self.rest.contains(&i)
        }
    }
    pub fn is_empty(&self) -> bool {
        self.first == 0 && self.rest.is_empty()
    }
}

/// The Pingora peer of one backend: its timeouts, TLS and HTTP version.
pub fn peer_for(config: &UpstreamConfig, b: &BackendConfig) -> HttpPeer {
    let tls = config.tls.as_ref();
    // The name sent (SNI) and verified: `tls.sni`, else the name the backend was written
    // with, else its IP address (verified against the certificate's IP names). None
    // without TLS: the peer is cloned for every request, and an empty name costs nothing.
    let sni = match tls {
        Some(t) => t
            .sni
            .clone()
            .or_else(|| b.host.clone())
            .unwrap_or_else(|| b.addr.ip().to_string()),
        None => String::new(),
    };
    let mut peer = HttpPeer::new(b.addr, tls.is_some(), sni);
    // Pooled connections are shared only within one upstream: another upstream on the same
    // address may trust another CA (Pingora's pool key does not hold the CA).
    peer.group_key = keys::stable_hash(config.name.as_bytes());
    let t = &config.timeouts;
    let o = &mut peer.options;
    o.connection_timeout = Some(t.connect);
    o.read_timeout = Some(t.read);
    o.write_timeout = Some(t.write);
    o.idle_timeout = Some(t.idle);
    if let Some(tls) = tls {
        o.verify_cert = tls.verify;
        o.verify_hostname = tls.verify;
        o.ca = tls.ca.clone();
        peer.client_cert_key = tls.client_cert.clone();
    }
    let o = &mut peer.options;
    o.alpn = match (config.protocol, tls.is_some()) {
        (Protocol::H1, _) | (Protocol::Auto, false) => ALPN::H1,
        (Protocol::H2, _) => ALPN::H2,
        (Protocol::Auto, true) => ALPN::H2H1,
    };
    // One h2 connection carries many requests at once.
    o.max_h2_streams = 100;
    peer
}

/// What a new backend state starts from: nothing (`Fresh`, healthy or not), or what the
/// backend of the same address learned under the previous configuration.
enum Start<'a> {
    Fresh { healthy: bool },
    Kept(&'a BackendState, bool),
}

/// The state of one backend of `config`; `addresses`: those of a backend written by
/// name (a kept backend keeps its own, with the one that connected last).
fn backend_state(
    config: &UpstreamConfig,
    b: &BackendConfig,
    source: Arc<str>,
    start: Start<'_>,
    addresses: Option<Arc<eyeballs::ResolvedAddresses>>,
    metrics: &Metrics,
) -> BackendState {
    let (learned, breaker, addresses) = match start {
        Start::Fresh { healthy } => {
            let learned = Learned::default();
            learned.healthy.store(healthy, Relaxed);
            (Arc::new(learned), None, addresses)
        }
        Start::Kept(old, same_breaker) => (
            Arc::clone(&old.learned),
            old.breaker.clone().filter(|_| same_breaker),
            addresses.map(|given| old.addresses.clone().unwrap_or(given)),
        ),
    };
    let breaker = breaker.or_else(|| config.breaker.as_ref().map(|c| Arc::new(Breaker::new(c))));
    let label: Arc<str> = match (&addresses, &b.host) {
        (Some(_), Some(name)) => format!("{name}:{}", b.addr.port()).into(),
        _ => b.addr.to_string().into(),
    };
    let mut peer = peer_for(config, b);
    if let Some(addresses) = &addresses {
        peer.options.custom_l4 = Some(Arc::new(eyeballs::Connector {
            addresses: Arc::clone(addresses),
            timeout: config.timeouts.connect,
        }));
    }
    let outcome = |o: &str| {
        metrics
            .upstream_requests
            .with_label_values(&[config.name.as_str(), &*label, o])
    };
    BackendState {
        addr: b.addr,
        weight: b.weight,
        host: b.host.clone(),
        name: b.name.as_deref().map(Arc::from),
        source,
        learned,
        breaker,
        peer,
        host_header: host_header(config, b),
        addresses,
        outcomes: Outcomes {
            ok: outcome("ok"),
            error: outcome("error"),
            timeout: outcome("timeout"),
        },
        sticky_id: sticky::backend_id(&config.name, &label),
        label,
    }
}

/// `a, b, c`, for logs.
fn show_addrs(addrs: &[SocketAddr]) -> String {
    let shown: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    shown.join(", ")
}

/// The `source` of backends written in the file.
const STATIC: &str = "static";

impl BackendState {
    /// Whether it was written in the file (not found by DNS).
    pub fn is_static(&self) -> bool {
        &*self.source == STATIC
    }

    /// What it was configured (or found) as: for its health check's probe.
    pub fn config(&self) -> BackendConfig {
        BackendConfig {
            addr: self.addr,
            weight: self.weight,
            host: self.host.clone(),
            name: self.name.as_deref().map(String::from),
        }
    }
}

impl BackendSet {
    fn new(balance: Balance, backends: Vec<Arc<BackendState>>) -> BackendSet {
        let addrs: Vec<(SocketAddr, u32)> = backends.iter().map(|b| (b.addr, b.weight)).collect();
        BackendSet {
            balancer: Balancer::new(balance, &addrs),
            backends,
        }
    }
}

/// The backends an upstream has now, and the balancer built over them.
pub struct BackendSet {
    pub backends: Vec<Arc<BackendState>>,
    balancer: Balancer,
}

pub struct Upstream {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    set: ArcSwap<BackendSet>,
    /// For the outcome counters of backends found later.
    metrics: Arc<Metrics>,
    /// Counts attempts that were retried.
    pub retries: IntCounter,
    /// `retry_budget:` (a reload starts it afresh).
    pub retry_budget: Option<Arc<budget::RetryBudget>>,
    /// `concurrency:` (kept across a reload that does not change it).
    pub concurrency: Option<Arc<concurrency::Limiter>>,
    /// Upgraded connections (WebSocket) open to this upstream.
    pub tunnels_open: IntGauge,
    /// When the next open circuit's period ends, as nanoseconds after `epoch` (0: none):
    /// the schedule is rebuilt then so that backend can be probed.
    reopen_at: AtomicU64,
    /// A rebuild of the schedule is queued ([`Upstream::refresh_soon`]).
    refreshing: AtomicBool,
    epoch: Instant,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, metrics: &Arc<Metrics>) -> Upstream {
        let backends: Vec<Arc<BackendState>> = config
            .backends
            .iter()
            .map(|b| {
                let start = Start::Fresh { healthy: true };
                Arc::new(backend_state(
                    config,
                    b,
                    STATIC.into(),
                    start,
                    None,
                    metrics,
                ))
            })
            .collect();
        Upstream::with_backends(config, metrics, backends, None)
    }

    /// The upstream `config` describes, succeeding `previous` (the same name under the
    /// configuration being replaced): a backend at an address `previous` has keeps what
    /// it learned (health, streaks, in-flight count, and its circuit unless `breaker:`
    /// changed), backends `previous` found by DNS stay while their name is still listed
    /// (discovery goes on from them), and a new backend waits for its health checks, as
    /// one found by DNS does.
    pub fn succeeding(
        config: &UpstreamConfig,
        metrics: &Arc<Metrics>,
        previous: &Upstream,
    ) -> Upstream {
        let old = previous.backends();
        let same_breaker = config.breaker == previous.config.breaker;
        let start = |addr: SocketAddr| match old.backends.iter().find(|b| b.addr == addr) {
            Some(b) => Start::Kept(b, same_breaker),
            None => Start::Fresh {
                healthy: config.health_check.is_none(),
            },
        };
        let mut backends: Vec<Arc<BackendState>> = config
            .backends
            .iter()
            .map(|b| {
                Arc::new(backend_state(
                    config,
                    b,
                    STATIC.into(),
                    start(b.addr),
                    None,
                    metrics,
                ))
            })
            .collect();
        for b in old.backends.iter().filter(|b| !b.is_static()) {
            let listed = config.discover.iter().any(|d| {
                *b.source == *format!("dns:{}", d.name)
                    && d.port == b.addr.port()
                    && (d.resolves_to == ResolvesTo::OneBackend) == b.addresses.is_some()
            });
            if listed && !backends.iter().any(|n| n.addr == b.addr) {
                let source = Arc::clone(&b.source);
                let start = Start::Kept(b, same_breaker);
                backends.push(Arc::new(backend_state(
                    config,
                    &b.config(),
                    source,
                    start,
                    b.addresses.clone(),
                    metrics,
                )));
            }
        }
        // The limit it learned, and the slots held under it, stay if it is the same.
        let limiter = previous
            .concurrency
            .clone()
            .filter(|l| Some(l.config()) == config.concurrency.as_ref());
        Upstream::with_backends(config, metrics, backends, limiter)
    }

    fn with_backends(
        config: &UpstreamConfig,
        metrics: &Arc<Metrics>,
        backends: Vec<Arc<BackendState>>,
        limiter: Option<Arc<concurrency::Limiter>>,
    ) -> Upstream {
        let name = config.name.as_str();
        let limiter = limiter.or_else(|| {
            let c = config.concurrency.as_ref()?;
            Some(Arc::new(concurrency::Limiter::new(
                c,
                metrics.concurrency_limit.with_label_values(&[name]),
                metrics.shed.with_label_values(&[name, "concurrency"]),
            )))
        });
        let upstream = Upstream {
            name: config.name.as_str().into(),
            set: ArcSwap::from_pointee(BackendSet::new(config.balance, backends)),
            retries: metrics.upstream_retries.with_label_values(&[name]),
            retry_budget: config.retry_budget.map(|share| {
                Arc::new(budget::RetryBudget::new(
                    share,
                    metrics.shed.with_label_values(&[name, "retry_budget"]),
                ))
            }),
            concurrency: limiter,
            tunnels_open: metrics.tunnels_open.with_label_values(&[name]),
            config: config.clone(),
            metrics: Arc::clone(metrics),
            reopen_at: AtomicU64::new(0),
            refreshing: AtomicBool::new(false),
            epoch: Instant::now(),
        };
        upstream.refresh();
        upstream
    }

    /// The backends as they are now (a snapshot: DNS may swap in another set meanwhile).
    pub fn backends(&self) -> Arc<BackendSet> {
        self.set.load_full()
    }

    /// Puts what each name resolved to (`(name, its addresses)`) beside the backends
    /// written as addresses. A `dns:` name's addresses are a backend each; a name written
    /// `NAME:PORT` is one backend, which takes its new addresses in place. Backends already
    /// known keep their state; new ones start unhealthy when the upstream has health checks
    /// (they get traffic once those pass), healthy otherwise — except `at_start`, when
    /// every backend is assumed healthy, as the written ones are; those no longer found
    /// leave the set and drain. Returns whether the set changed.
    pub fn set_discovered(&self, found: &[(&DnsBackend, &[SocketAddr])], at_start: bool) -> bool {
        let current = self.set.load_full();
        let mut next: Vec<Arc<BackendState>> = current
            .backends
            .iter()
            .filter(|b| b.is_static())
            .cloned()
            .collect();
        let healthy = at_start || self.config.health_check.is_none();
        for (dns, addrs) in found {
            let source = format!("dns:{}", dns.name);
            let known = |b: &&Arc<BackendState>| {
                *b.source == *source && b.weight == dns.weight && b.addr.port() == dns.port
            };
            let fresh = |addr: SocketAddr, addresses: Option<Arc<eyeballs::ResolvedAddresses>>| {
                let config = BackendConfig {
                    addr,
                    weight: dns.weight,
                    host: Some(dns.name.clone()),
                    name: dns.display.clone(),
                };
                let start = Start::Fresh { healthy };
                let source = source.as_str().into();
                Arc::new(backend_state(
                    &self.config,
                    &config,
                    source,
                    start,
                    addresses,
                    &self.metrics,
                ))
            };
            match dns.resolves_to {
                ResolvesTo::EachABackend => {
                    for addr in addrs.iter().copied() {
                        if next.iter().any(|b| b.addr == addr) {
                            continue; // written in the file too, or found twice
                        }
                        let kept = current
                            .backends
                            .iter()
                            .filter(known)
                            .find(|b| b.addr == addr && b.addresses.is_none());
                        next.push(match kept {
                            Some(b) => Arc::clone(b),
                            None => fresh(addr, None),
                        });
                    }
                }
                ResolvesTo::OneBackend => {
                    let kept = current
                        .backends
                        .iter()
                        .filter(known)
                        .find(|b| b.addresses.is_some());
                    if let Some((b, addresses)) =
                        kept.and_then(|b| Some((b, b.addresses.as_ref()?)))
                    {
                        if addresses.all().as_slice() != *addrs && !addrs.is_empty() {
                            addresses.set(addrs.to_vec());
                            info!(
                                "upstream {}: {} now resolves to {}",
                                self.name,
                                b.label,
                                show_addrs(addrs)
                            );
                        }
                        next.push(Arc::clone(b));
                        continue;
                    }
                    let addresses = Arc::new(eyeballs::ResolvedAddresses::new(addrs.to_vec()));
                    // Its identity (balancing, reloads): the address tried first now.
                    let Some(&addr) = addresses.order().first() else {
                        continue; // not resolved yet
                    };
                    if !next.iter().any(|b| b.addr == addr) {
                        next.push(fresh(addr, Some(addresses)));
                    }
                }
            }
        }
        let same = next.len() == current.backends.len()
            && next
                .iter()
                .zip(&current.backends)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return false;
        }
        // The gauges of backends that left would otherwise stay at their last values.
        for gone in current
            .backends
            .iter()
            .filter(|b| !next.iter().any(|n| Arc::ptr_eq(n, b)))
        {
            let labels = [self.name(), &*gone.label];
            let m = &self.metrics;
            for gauge in [&m.backend_healthy, &m.backend_inflight, &m.circuit_open] {
                let _ = gauge.remove_label_values(&labels);
            }
        }
        self.set
            .store(Arc::new(BackendSet::new(self.config.balance, next)));
        self.refresh();
        true
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Rebuilds the selection schedule after a backend left or returned, and notes when
    /// the next open circuit may be probed.
    pub fn refresh(&self) {
        let now = Instant::now();
        let set = self.set.load();
        set.balancer
            .refresh(&set.backends, |i| set.backends[i].available(now));
        let next = set
            .backends
            .iter()
            .filter_map(|b| match b.circuit(now) {
                Circuit::Open(Some(until)) => Some(until),
                _ => None,
            })
            .min();
        let nanos = next.map_or(0, |t| {
            t.saturating_duration_since(self.epoch).as_nanos().max(1) as u64
        });
        self.reopen_at.store(nanos, Relaxed);
    }

    /// [`Upstream::refresh`] off the request path: a weighted schedule has up to 65,536
    /// steps to compute, so a request that notices a circuit change leaves the rebuild to
    /// the blocking pool (one at a time; requests meanwhile skip unavailable backends in
    /// the old schedule). Outside a runtime (tests, start-up) it is done at once.
    pub fn refresh_soon(self: &Arc<Self>) {
        if self.refreshing.swap(true, Relaxed) {
            return; // one is already on its way, and will see this change
        }
        let upstream = Arc::clone(self);
        let rebuild = move || {
            upstream.refreshing.store(false, Relaxed);
            upstream.refresh();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(rebuild)),
            Err(_) => rebuild(),
        }
    }

    /// Marks a backend healthy or not; returns whether that changed anything.
    pub fn set_healthy(&self, backend: &BackendState, healthy: bool) -> bool {
        let changed = backend.learned.healthy.swap(healthy, Relaxed) != healthy;
        if changed {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            let ms = now.map_or(1, |d| d.as_millis().max(1) as u64);
            backend.learned.health_since_ms.store(ms, Relaxed);
            self.refresh();
        }
        changed
    }

    /// Requests in flight to its backends.
    pub fn inflight(&self) -> usize {
        self.set
            .load()
            .backends
            .iter()
            .map(|b| b.learned.inflight.load(Relaxed))
            .sum()
    }

    /// Whether any backend may take requests now.
    pub fn has_available(&self) -> bool {
        let now = Instant::now();
        self.set.load().backends.iter().any(|b| b.available(now))
    }

    /// [`Upstream::select`] with the request's hash key, for consistent hashing.
    pub fn select_for(
        self: &Arc<Self>,
        req: &RequestHeader,
        client: &Client,
        tried: &Tried,
    ) -> Option<Lease> {
        let mut buf = [0u8; 16];
        let key: &[u8] = match self.config.balance {
            Balance::ConsistentHash => {
                keys::key_bytes(req, client, &self.config.hash_key, &mut buf)
            }
            _ => b"",
        };
        self.select(key, tried)
    }

    /// Whether a backend not yet `tried` is available now: where a request that could not
    /// connect goes next.
    pub fn has_untried(&self, tried: &Tried) -> bool {
        let now = Instant::now();
        let set = self.set.load();
        let mut backends = set.backends.iter().enumerate();
        backends.any(|(i, b)| !tried.contains(i) && b.available(now))
    }

    /// Picks an available backend for a request, preferring ones not yet `tried`, and
    /// leases it. `key` feeds consistent hashing. `None`: no backend is available.
    pub fn select(self: &Arc<Self>, key: &[u8], tried: &Tried) -> Option<Lease> {
        let now = Instant::now();
        let reopen = self.reopen_at.load(Relaxed);
        if reopen != 0 && now.saturating_duration_since(self.epoch).as_nanos() as u64 >= reopen {
            self.refresh_soon();
        }
        let set = self.set.load();
        let bs = &set.backends;
        let mut refused = Tried::default();
        for _ in 0..bs.len() {
            let usable = |i: usize| bs[i].available(now) && !refused.contains(i);
            let fresh = set
                .balancer
                .pick(bs, key, |i| usable(i) && !tried.contains(i));
            let index = match fresh {
                Some(i) => i,
                None if !tried.is_empty() => set.balancer.pick(bs, key, usable)?,
                None => return None,
            };
            match self.lease(&bs[index], index, now) {
                Some(lease) => return Some(lease),
                // Another request took the probe meanwhile: choose again.
                None => refused.add(index),
            }
        }
        None
    }

    /// The backend whose `sticky:` id is `id`, leased, if it is available and not yet
    /// `tried`; `None` sends the request to [`Upstream::select_for`].
    pub fn select_sticky(self: &Arc<Self>, id: u64, tried: &Tried) -> Option<Lease> {
        let now = Instant::now();
        let set = self.set.load();
        let (index, backend) = set
            .backends
            .iter()
            .enumerate()
            .find(|(_, b)| b.sticky_id == id)?;
        if tried.contains(index) || !backend.available(now) {
            return None;
        }
        self.lease(backend, index, now)
    }

    /// Leases `backend` (at `index`), unless its circuit is half-open and another request
    /// holds the probe.
    fn lease(
        self: &Arc<Self>,
        backend: &Arc<BackendState>,
        index: usize,
        now: Instant,
    ) -> Option<Lease> {
        let probe = match &backend.breaker {
            None => false,
            Some(b) => b.admit(now)?,
        };
        backend.learned.inflight.fetch_add(1, Relaxed);
        Some(Lease {
            upstream: Arc::clone(self),
            backend: Arc::clone(backend),
            index,
            probe,
            reported: false,
            since: self.concurrency.as_ref().map(|_| now),
            held: None,
            span: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeySource, Timeouts};

    fn upstream(n: u16) -> Arc<Upstream> {
        let config = UpstreamConfig {
            name: "big".into(),
            balance: Balance::RoundRobin,
            hash_key: KeySource::ClientIp,
            backends: (0..n)
                .map(|i| BackendConfig {
                    addr: SocketAddr::from(([127, 0, 0, 1], 10_000 + i)),
                    weight: 1,
                    host: None,
                    name: None,
                })
                .collect(),
            discover: Vec::new(),
            health_check: None,
            breaker: None,
            timeouts: Timeouts::default(),
            retries: 2,
            retry_budget: None,
            concurrency: None,
            tls: None,
            protocol: crate::config::Protocol::H1,
            host_header: HostHeader::Pass,
            sticky: None,
        };
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        Arc::new(Upstream::new(&config, &metrics))
    }

    #[test]
    fn tried_remembers_any_index() {
        let mut t = Tried::default();
        assert!(t.is_empty());
        for i in [0, 127, 128, 300, 300, 10_000] {
            t.add(i);
        }
        for i in [0, 127, 128, 300, 10_000] {
            assert!(t.contains(i), "{i}");
        }
        for i in [1, 129, 299, 9_999] {
            assert!(!t.contains(i), "{i}");
        }
        assert!(!t.is_empty());
    }

    #[test]
    fn a_retry_never_goes_back_to_a_tried_backend_past_the_128th() {
        let u = upstream(200);
        // Walk the round robin until it hands out every backend once, marking each tried:
        // no backend, however high its index, may come back while untried ones remain.
        let mut tried = Tried::default();
        for _ in 0..200 {
            let lease = u.select(b"", &tried).expect("a backend");
            assert!(!tried.contains(lease.index()), "{} again", lease.index());
            tried.add(lease.index());
        }
        // All tried: a retry may reuse one rather than fail.
        assert!(u.select(b"", &tried).is_some());
    }

    /// `api.test` on each of `ports`, at 127.0.0.2.
    fn found(ports: &[u16]) -> Vec<(DnsBackend, Vec<SocketAddr>)> {
        ports
            .iter()
            .map(|p| {
                let dns = DnsBackend {
                    name: "api.test".into(),
                    port: *p,
                    weight: 1,
                    interval: Duration::from_secs(10),
                    display: None,
                    resolves_to: ResolvesTo::EachABackend,
                };
                (dns, vec![SocketAddr::from(([127, 0, 0, 2], *p))])
            })
            .collect()
    }

    fn answers(found: &[(DnsBackend, Vec<SocketAddr>)]) -> Vec<(&DnsBackend, &[SocketAddr])> {
        found.iter().map(|(d, a)| (d, a.as_slice())).collect()
    }

    #[test]
    fn dns_changes_keep_the_state_of_backends_that_stay() {
        let mut config = upstream(1).config.clone();
        config.balance = Balance::ConsistentHash;
        config.health_check = Some(crate::config::HealthCheckConfig {
            kind: crate::config::HealthCheckType::Tcp,
            path: "/".into(),
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(1),
            healthy_after: 1,
            unhealthy_after: 1,
        });
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let u = Arc::new(Upstream::new(&config, &metrics));
        assert!(u.set_discovered(&answers(&found(&[1, 2, 3])), true));
        let before = u.backends();
        assert_eq!(before.backends.len(), 4);
        assert!(
            before.backends.iter().all(|b| b.healthy()),
            "at start all are healthy"
        );
        // A request in flight, and where keys go.
        let lease = u.select(b"k", &Tried::default()).expect("backend");
        let leased = lease.backend().addr;
        let keys: Vec<String> = (0..300).map(|i| format!("client-{i}")).collect();
        let pick = |u: &Arc<Upstream>, k: &str| {
            u.select(k.as_bytes(), &Tried::default())
                .map(|l| l.backend().addr)
        };
        let where_before: Vec<_> = keys.iter().map(|k| pick(&u, k)).collect();

        // Unchanged answer: nothing happens.
        assert!(!u.set_discovered(&answers(&found(&[1, 2, 3])), false));
        // :3 leaves, :4 arrives.
        assert!(u.set_discovered(&answers(&found(&[1, 2, 4])), false));
        let after = u.backends();
        let addrs: Vec<u16> = after.backends.iter().map(|b| b.addr.port()).collect();
        assert_eq!(addrs, vec![10_000, 1, 2, 4]);
        for b in &after.backends {
            if let Some(old) = before.backends.iter().find(|o| o.addr == b.addr) {
                assert!(Arc::ptr_eq(old, b), "{} kept its state", b.label);
            }
        }
        let newcomer = &after.backends[3];
        assert!(
            !newcomer.healthy(),
            "a new backend waits for its health checks"
        );
        assert_eq!(&*newcomer.source, "dns:api.test");
        // The lease still counts on its backend, wherever it is now.
        let still = after.backends.iter().find(|b| b.addr == leased);
        if let Some(b) = still {
            assert_eq!(b.inflight(), 1);
        }
        drop(lease);
        // Keys on backends that stayed stay on them (the ring moves only :3's keys).
        for (k, was) in keys.iter().zip(&where_before) {
            let now = pick(&u, k);
            if was.is_some_and(|a| a.port() != 3) {
                assert_eq!(now, *was, "{k} moved");
            }
            assert_ne!(
                now.map(|a| a.port()),
                Some(3),
                "{k} went to a backend that left"
            );
            assert_ne!(
                now.map(|a| a.port()),
                Some(4),
                "{k} went to an unchecked backend"
            );
        }
    }

    #[test]
    fn a_name_written_as_an_address_is_one_backend_whose_addresses_change_in_place() {
        let mut config = upstream(1).config.clone();
        config.backends.clear();
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let u = Arc::new(Upstream::new(&config, &metrics));
        let dns = DnsBackend {
            name: "web.test".into(),
            port: 8080,
            weight: 1,
            interval: Duration::from_secs(10),
            display: Some("web".into()),
            resolves_to: ResolvesTo::OneBackend,
        };
        let v4 = SocketAddr::from(([127, 0, 0, 1], 8080));
        let v6: SocketAddr = "[::1]:8080".parse().expect("address");
        assert!(u.set_discovered(&[(&dns, &[v4, v6][..])], true));
        let set = u.backends();
        assert_eq!(set.backends.len(), 1);
        let b = Arc::clone(&set.backends[0]);
        assert_eq!(&*b.label, "web.test:8080");
        assert_eq!(b.shown(), "web (web.test:8080)");
        assert_eq!(b.addr, v6, "identified by the address tried first: IPv6");
        // Another answer: the same backend, with its new addresses.
        let v4b = SocketAddr::from(([127, 0, 0, 2], 8080));
        assert!(!u.set_discovered(&[(&dns, &[v4b][..])], false));
        let set = u.backends();
        assert!(Arc::ptr_eq(&set.backends[0], &b));
        let addresses = b.addresses.as_ref().expect("addresses");
        assert_eq!(addresses.order(), vec![v4b]);
        // A reload keeps it, and its addresses.
        let mut next = config.clone();
        next.discover = vec![dns.clone()];
        let after = Upstream::succeeding(&next, &metrics, &u);
        let kept = &after.backends().backends[0];
        assert!(std::ptr::eq(kept.learned(), b.learned()));
        assert!(Arc::ptr_eq(
            kept.addresses.as_ref().expect("addresses"),
            addresses
        ));
    }
}
