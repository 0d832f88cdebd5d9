//! Upstreams: the backends of each `upstreams:` entry, their live state (health, in-flight
//! requests) and the one place that picks a backend for a request, [`Upstream::select`].
//!
//! A backend's state lives in a [`BackendState`] shared by the balancer, the active health
//! checker ([`health`]) and the admin endpoints. Its in-flight counter is raised by a
//! [`Lease`] when a request is sent to it and lowered when the lease drops, which happens
//! on every path (answer, error, retry, client gone) because the lease lives in the
//! request's context.

pub mod balance;
pub mod health;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use pingora_core::upstreams::peer::HttpPeer;
use prometheus::IntCounter;

use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use balance::{Balancer, Candidate};

/// Outcome counters of one backend, resolved once so the request path formats no labels.
pub struct Outcomes {
    pub ok: IntCounter,
    pub error: IntCounter,
    pub timeout: IntCounter,
}

pub struct BackendState {
    pub addr: SocketAddr,
    /// `IP:PORT`, the `backend` label of metrics and logs.
    pub label: Arc<str>,
    pub weight: u32,
    healthy: AtomicBool,
    inflight: AtomicUsize,
    /// Connection settings (timeouts, keep-alive) cloned for each request.
    peer: HttpPeer,
    pub outcomes: Outcomes,
}

impl BackendState {
    pub fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Relaxed)
    }

    /// Whether new requests may be sent here now.
    pub fn available(&self) -> bool {
        self.healthy()
    }

    /// A fresh peer for one request to this backend.
    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(self.peer.clone())
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

/// One in-flight request on a backend; dropping it ends the request's share of the load.
pub struct Lease {
    backend: Arc<BackendState>,
    index: usize,
}

impl Lease {
    fn new(backend: Arc<BackendState>, index: usize) -> Lease {
        backend.inflight.fetch_add(1, Relaxed);
        Lease { backend, index }
    }

    pub fn backend(&self) -> &BackendState {
        &self.backend
    }

    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.inflight.fetch_sub(1, Relaxed);
    }
}

/// Backends a request already tried (its retries avoid them while others remain).
#[derive(Debug, Default, Clone, Copy)]
pub struct Tried(u128);

impl Tried {
    pub fn add(&mut self, i: usize) {
        if i < 128 {
            self.0 |= 1 << i;
        }
    }
    pub fn contains(&self, i: usize) -> bool {
        i < 128 && self.0 & (1 << i) != 0
    }
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

pub struct Upstream {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    pub backends: Vec<Arc<BackendState>>,
    balancer: Balancer,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, metrics: &Metrics) -> Upstream {
        let name = config.name.as_str();
        let backends: Vec<Arc<BackendState>> = config
            .backends
            .iter()
            .map(|b| {
                let label: Arc<str> = b.addr.to_string().into();
                let mut peer = HttpPeer::new(b.addr, false, String::new());
                let t = &config.timeouts;
                peer.options.connection_timeout = Some(t.connect);
                peer.options.read_timeout = Some(t.read);
                peer.options.write_timeout = Some(t.write);
                peer.options.idle_timeout = Some(t.idle);
                let outcome = |o: &str| {
                    metrics
                        .upstream_requests
                        .with_label_values(&[name, &*label, o])
                };
                Arc::new(BackendState {
                    addr: b.addr,
                    weight: b.weight,
                    healthy: AtomicBool::new(true),
                    inflight: AtomicUsize::new(0),
                    peer,
                    outcomes: Outcomes {
                        ok: outcome("ok"),
                        error: outcome("error"),
                        timeout: outcome("timeout"),
                    },
                    label,
                })
            })
            .collect();
        let addrs: Vec<(SocketAddr, u32)> = backends.iter().map(|b| (b.addr, b.weight)).collect();
        let upstream = Upstream {
            name: config.name.as_str().into(),
            balancer: Balancer::new(config.balance, &addrs),
            config: config.clone(),
            backends,
        };
        upstream.refresh();
        upstream
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Rebuilds the selection schedule after a backend left or returned.
    pub fn refresh(&self) {
        self.balancer
            .refresh(&self.backends, |i| self.backends[i].available());
    }

    /// Marks a backend healthy or not; returns whether that changed anything.
    pub fn set_healthy(&self, index: usize, healthy: bool) -> bool {
        let changed = self.backends[index].healthy.swap(healthy, Relaxed) != healthy;
        if changed {
            self.refresh();
        }
        changed
    }

    /// Whether any backend may take requests now.
    pub fn has_available(&self) -> bool {
        self.backends.iter().any(|b| b.available())
    }

    /// Picks an available backend for a request, preferring ones not yet `tried`, and
    /// leases it. `key` feeds consistent hashing. `None`: no backend is available.
    pub fn select(&self, key: &[u8], tried: &Tried) -> Option<Lease> {
        let bs = &self.backends;
        let fresh = self
            .balancer
            .pick(bs, key, |i| bs[i].available() && !tried.contains(i));
        let index = match fresh {
            Some(i) => Some(i),
            None if !tried.is_empty() => self.balancer.pick(bs, key, |i| bs[i].available()),
            None => None,
        }?;
        Some(Lease::new(Arc::clone(&bs[index]), index))
    }
}
