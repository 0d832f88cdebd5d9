//! Backends found by DNS (`{ dns: NAME, port: P, interval: I }` in an upstream's
//! `backends:`, and the addresses of a backend written `NAME:PORT`), as a Pingora background service — the role Pingora's `ServiceDiscovery`
//! trait plays for its own `LoadBalancer`, here feeding fanout's [`Upstream`], whose
//! balancing state must survive each change. Every name is looked up (A and AAAA) once
//! before the server starts serving, so no request finds an upstream still empty, and
//! then every `interval`; when the union of an upstream's answers differs from its set,
//! [`Upstream::set_discovered`] swaps the set: backends that stay keep their state, new
//! ones get traffic after their health checks, those gone drain.
//!
//! A lookup that fails (timeout, SERVFAIL, NXDOMAIN, no records) keeps the name's last
//! addresses, logged once per run of failures: a DNS outage must not empty an upstream.
//! The resolver is hickory's, configured by `resolver:` (or the system's
//! `/etc/resolv.conf`, `/etc/hosts` first); it honours the records' TTLs, so a name is
//! asked again no sooner than its TTL allows and no later than its interval.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::config::{NameServerConfig, ResolverConfig as HickoryConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use log::{info, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::task::JoinSet;

use super::follow::{each_upstream, UpstreamsWatch};
use super::Upstream;
use crate::config::{DnsBackend, ResolverConfig};

/// What one name resolved to last: its addresses, with its port.
type Found = Vec<SocketAddr>;

/// Builds the resolver `config` describes (`None`: the system's configuration).
pub fn resolver(config: Option<&ResolverConfig>) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = match config {
        None => TokioResolver::builder(provider)
            .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?,
        Some(c) => {
            let servers = c
                .nameservers
                .iter()
                .map(|ns| {
                    let mut server = NameServerConfig::udp_and_tcp(ns.ip());
                    for conn in &mut server.connections {
                        conn.port = ns.port();
                    }
                    server
                })
                .collect();
            TokioResolver::builder_with_config(HickoryConfig::from_name_servers(servers), provider)
        }
    };
    let opts = builder.options_mut();
    if let Some(c) = config {
        opts.timeout = c.timeout;
    }
    opts.attempts = 1;
    builder
        .build()
        .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
}

/// Looks `dns` up: its addresses on its port, sorted; `Err` says why not.
async fn lookup(resolver: &TokioResolver, dns: &DnsBackend) -> Result<Found, String> {
    // A trailing dot: the name as written, never one of the search domains'.
    let name = format!("{}.", dns.name);
    let answer = resolver
        .lookup_ip(name.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let mut found: Found = answer
        .iter()
        .map(|ip: IpAddr| SocketAddr::new(ip, dns.port))
        .collect();
    if found.is_empty() {
        return Err("no address records".into());
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// One upstream's names and what each resolved to last.
struct Watched {
    upstream: Arc<Upstream>,
    names: Vec<DnsBackend>,
    found: Vec<Found>,
    failing: Vec<bool>,
}

impl Watched {
    /// Applies the union of every name's last answer to the upstream.
    fn apply(&self, at_start: bool) {
        let all: Vec<(&DnsBackend, &[SocketAddr])> = self
            .names
            .iter()
            .zip(&self.found)
            .map(|(dns, found)| (dns, found.as_slice()))
            .collect();
        if self.upstream.set_discovered(&all, at_start) {
            let now: Vec<String> = self
                .upstream
                .backends()
                .backends
                .iter()
                .map(|b| b.label.to_string())
                .collect();
            info!(
                "upstream {}: backends now {}",
                self.upstream.name(),
                now.join(", ")
            );
        }
    }

    /// Takes the answer for name `i`; returns whether it changed what the name stands for.
    fn take(&mut self, i: usize, answer: Result<Found, String>) -> bool {
        let dns = &self.names[i];
        match answer {
            Ok(found) => {
                if std::mem::replace(&mut self.failing[i], false) {
                    info!(
                        "upstream {}: {} resolves again",
                        self.upstream.name(),
                        dns.name
                    );
                }
                if found == self.found[i] {
                    return false;
                }
                self.found[i] = found;
                true
            }
            Err(why) => {
                if !std::mem::replace(&mut self.failing[i], true) {
                    warn!(
                        "upstream {}: cannot resolve {}: {why}; keeping its last {} address(es)",
                        self.upstream.name(),
                        dns.name,
                        self.found[i].len()
                    );
                }
                false
            }
        }
    }
}

/// The discovery service: every upstream with `dns:` backends, as reloads change them.
/// Its resolver is made in the runtime that uses it (a resolver's sockets belong to the
/// runtime they were made in).
pub struct Discovery {
    resolver: Option<ResolverConfig>,
    upstreams: Vec<Arc<Upstream>>,
    /// The upstreams in force, followed once the service runs.
    live: Option<UpstreamsWatch>,
}

impl Discovery {
    /// Fails when the resolver cannot be set up (the system's configuration unreadable).
    pub fn new(
        resolver: Option<&ResolverConfig>,
        upstreams: &[Arc<Upstream>],
    ) -> Result<Discovery, String> {
        let upstreams: Vec<Arc<Upstream>> = upstreams
            .iter()
            .filter(|u| !u.config.discover.is_empty())
            .cloned()
            .collect();
        if !upstreams.is_empty() {
            // Checked now, so that a broken setup stops the start with its reason.
            self::resolver(resolver)?;
        }
        Ok(Discovery {
            resolver: resolver.cloned(),
            upstreams,
            live: None,
        })
    }

    /// Follows `live` once running: a reload that adds, changes or removes `dns:`
    /// backends starts and stops their lookups.
    pub fn following(mut self, live: UpstreamsWatch) -> Discovery {
        self.live = Some(live);
        self
    }

    /// Looks every name up once, in a runtime of its own, and applies the answers, within
    /// `limit` in all: what the server starts with. Names that do not answer in time are
    /// logged, and looked up again by the service.
    pub fn resolve_at_start(&self, limit: Duration) -> Result<(), String> {
        if self.upstreams.is_empty() {
            return Ok(());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("DNS at start: {e}"))?;
        rt.block_on(self.resolve_all(limit))
    }

    async fn resolve_all(&self, limit: Duration) -> Result<(), String> {
        let resolver = Arc::new(resolver(self.resolver.as_ref())?);
        let mut lookups = JoinSet::new();
        for (u, up) in self.upstreams.iter().enumerate() {
            for (i, dns) in up.config.discover.iter().enumerate() {
                let (resolver, dns) = (Arc::clone(&resolver), dns.clone());
                lookups.spawn(async move { (u, i, lookup(&resolver, &dns).await) });
            }
        }
        let mut watched: Vec<Watched> = self.upstreams.iter().map(watch).collect();
        let deadline = tokio::time::Instant::now() + limit;
        while let Ok(Some(Ok((u, i, answer)))) =
            tokio::time::timeout_at(deadline, lookups.join_next()).await
        {
            watched[u].take(i, answer);
        }
        for w in &watched {
            for (i, dns) in w.names.iter().enumerate() {
                if w.found[i].is_empty() && !w.failing[i] {
                    warn!(
                        "upstream {}: {} did not resolve within {limit:?} at start",
                        w.upstream.name(),
                        dns.name
                    );
                }
            }
            w.apply(true);
        }
        Ok(())
    }
}

fn watch(up: &Arc<Upstream>) -> Watched {
    let names = up.config.discover.clone();
    // What the upstream already has from each name (the lookups at start).
    let set = up.backends();
    let found = names
        .iter()
        .map(|dns| {
            let source = format!("dns:{}", dns.name);
            set.backends
                .iter()
                .filter(|b| *b.source == *source && b.addr.port() == dns.port)
                .flat_map(|b| match &b.addresses {
                    Some(addresses) => addresses.all().to_vec(),
                    None => vec![b.addr],
                })
                .collect()
        })
        .collect();
    Watched {
        failing: vec![false; names.len()],
        found,
        names,
        upstream: Arc::clone(up),
    }
}

#[async_trait]
impl BackgroundService for Discovery {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(live) = self.live.clone() else {
            let _ = shutdown.changed().await;
            return;
        };
        // Made when a name is first to be looked up: most configurations have none.
        let made: std::sync::OnceLock<Option<Arc<TokioResolver>>> = std::sync::OnceLock::new();
        let config = self.resolver.clone();
        each_upstream(live, shutdown, |up| {
            if up.config.discover.is_empty() {
                return None;
            }
            let resolver = made.get_or_init(|| match resolver(config.as_ref()) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    warn!("DNS discovery stops: {e}");
                    None
                }
            });
            resolver.as_ref().map(|r| follow(Arc::clone(r), watch(up)))
        })
        .await;
    }
}

/// Looks each of one upstream's names up on its own interval, for ever.
async fn follow(resolver: Arc<TokioResolver>, mut w: Watched) {
    let mut due: Vec<tokio::time::Instant> = w
        .names
        .iter()
        .map(|dns| tokio::time::Instant::now() + dns.interval)
        .collect();
    loop {
        let Some((i, &when)) = due.iter().enumerate().min_by_key(|(_, t)| **t) else {
            return;
        };
        tokio::time::sleep_until(when).await;
        let dns = w.names[i].clone();
        // Bounded: a lookup never holds the next ones up longer than an interval.
        let answer = tokio::time::timeout(
            dns.interval.max(Duration::from_secs(1)),
            lookup(&resolver, &dns),
        )
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()));
        due[i] = tokio::time::Instant::now() + dns.interval;
        if w.take(i, answer) {
            w.apply(false);
        }
    }
}
