//! Active health checks, run as a Pingora background service. Each upstream with a
//! `health_check:` is probed every `interval`, all its backends at once, each probe bounded
//! by `timeout`. The probes themselves are pingora-load-balancing's `HttpHealthCheck`
//! (GET `path`, healthy on any 2xx) and `TcpHealthCheck` (connect); the streak counting
//! (`healthy_after`, `unhealthy_after`) is ours, so transitions update the balancer at
//! once and are logged. Each round probes the upstream's backends as they are then: one
//! that DNS added is probed from the next round on, and gets traffic once it has passed
//! `healthy_after` probes. The streaks live in each backend's learned state, so a reload
//! that replaces the upstream goes on counting where the last round left off.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use log::{info, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora_load_balancing::Backend;
use tokio::task::JoinSet;

use super::follow::{each_upstream, UpstreamsWatch};
use super::{BackendState, Upstream};
use crate::config::{HealthCheckConfig, HealthCheckType, UpstreamConfig};
use std::sync::atomic::Ordering::Relaxed;

type Probe = Arc<dyn HealthCheck + Send + Sync>;

pub struct HealthChecker {
    upstreams: UpstreamsWatch,
}

impl HealthChecker {
    pub fn new(upstreams: UpstreamsWatch) -> Self {
        HealthChecker { upstreams }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, shutdown: ShutdownWatch) {
        each_upstream(self.upstreams.clone(), shutdown, |up| {
            up.config
                .health_check
                .is_some()
                .then(|| check_forever(Arc::clone(up)))
        })
        .await;
    }
}

/// The probe of one backend; HTTP probes go out as its requests do (TLS, HTTP version).
fn probe_for(
    hc: &HealthCheckConfig,
    config: &UpstreamConfig,
    state: &BackendState,
) -> Result<Probe, Box<Error>> {
    let backend = &state.config();
    // A backend written by name is probed as its requests connect: each of its addresses
    // in turn.
    let connector = state.addresses.as_ref().map(|addresses| {
        Arc::new(super::eyeballs::Connector {
            addresses: Arc::clone(addresses),
            timeout: hc.timeout,
        }) as Arc<dyn pingora_core::connectors::L4Connect + Send + Sync>
    });
    let label = backend.addr.to_string();
    let host = backend.host.as_deref().unwrap_or(&label);
    Ok(match hc.kind {
        HealthCheckType::Tcp => {
            let mut probe = TcpHealthCheck::new();
            probe.peer_template.options.connection_timeout = Some(hc.timeout);
            probe.peer_template.options.custom_l4 = connector;
            Arc::from(probe as Box<dyn HealthCheck + Send + Sync>)
        }
        HealthCheckType::Http => {
            let mut probe = HttpHealthCheck::new(host, false);
            probe.peer_template = super::peer_for(config, backend);
            let mut req = RequestHeader::build("GET", hc.path.as_bytes(), None)?;
            req.insert_header("Host", host)?;
            req.insert_header("User-Agent", "fanout-health-check")?;
            probe.req = req;
            probe.peer_template.options.connection_timeout = Some(hc.timeout);
            probe.peer_template.options.read_timeout = Some(hc.timeout);
            probe.peer_template.options.custom_l4 = connector;
            probe.validator = Some(Box::new(|resp| {
                if resp.status.is_success() {
                    Ok(())
                } else {
                    Error::e_explain(
                        ErrorType::HTTPStatus(resp.status.as_u16()),
                        format!("answered {}, not 2xx", resp.status.as_u16()),
                    )
                }
            }));
            Arc::new(probe)
        }
    })
}

/// A failed probe in words: what it found (`answered 503, not 2xx`), else the kind of
/// error, then its cause (`Connection refused`).
fn check_failure(e: &Error) -> String {
    let mut text = match &e.context {
        Some(c) => c.as_str().to_string(),
        None => e.etype.as_str().to_string(),
    };
    if let Some(cause) = &e.cause {
        text.push_str(&format!(": {cause}"));
    }
    text
}

/// One backend's probe and its streaks, kept while the backend is in the set.
struct Probing {
    backend: Arc<BackendState>,
    probe: Probe,
    target: Backend,
}

async fn check_forever(up: Arc<Upstream>) {
    let Some(hc) = up.config.health_check.clone() else {
        return;
    };
    // By address: a backend DNS keeps keeps its probe and streaks; one it drops loses them.
    let mut probing: HashMap<SocketAddr, Probing> = HashMap::new();
    let mut ticker = tokio::time::interval(hc.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let set = up.backends();
        probing.retain(|addr, p| {
            set.backends
                .iter()
                .any(|b| b.addr == *addr && Arc::ptr_eq(b, &p.backend))
        });
        for b in &set.backends {
            if probing.contains_key(&b.addr) {
                continue;
            }
            match (
                probe_for(&hc, &up.config, b),
                Backend::new(&b.addr.to_string()),
            ) {
                (Ok(probe), Ok(target)) => {
                    probing.insert(
                        b.addr,
                        Probing {
                            backend: Arc::clone(b),
                            probe,
                            target,
                        },
                    );
                }
                (Err(e), _) | (_, Err(e)) => warn!(
                    "upstream {}: cannot set up health check of {}: {e}",
                    up.name(),
                    b.label
                ),
            }
        }
        let mut round = JoinSet::new();
        for (addr, p) in &probing {
            let (probe, target, timeout, addr) =
                (Arc::clone(&p.probe), p.target.clone(), hc.timeout, *addr);
            round.spawn(async move {
                let started = std::time::Instant::now();
                let result = match tokio::time::timeout(timeout, probe.check(&target)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(check_failure(&e)),
                    Err(_) => Err(format!(
                        "no answer within {}",
                        crate::config::units::show_duration(timeout)
                    )),
                };
                (addr, result, started.elapsed())
            });
        }
        while let Some(joined) = round.join_next().await {
            let Ok((addr, result, latency)) = joined else {
                continue;
            };
            let Some(p) = probing.get_mut(&addr) else {
                continue;
            };
            let backend = &p.backend;
            backend
                .learned()
                .record_check(crate::upstream::CheckResult {
                    failure: result.as_ref().err().cloned(),
                    latency,
                    at: std::time::SystemTime::now(),
                });
            match result {
                Ok(()) => {
                    let learned = backend.learned();
                    learned.failures.store(0, Relaxed);
                    let successes = learned.successes.fetch_add(1, Relaxed).saturating_add(1);
                    if !backend.healthy()
                        && successes >= hc.healthy_after
                        && up.set_healthy(backend, true)
                    {
                        info!(
                            "upstream {}: backend {} is healthy{}",
                            up.name(),
                            backend.shown(),
                            if backend.is_static() { " again" } else { "" }
                        );
                    }
                }
                Err(why) => {
                    let learned = backend.learned();
                    learned.successes.store(0, Relaxed);
                    let failures = learned.failures.fetch_add(1, Relaxed).saturating_add(1);
                    if backend.healthy()
                        && failures >= hc.unhealthy_after
                        && up.set_healthy(backend, false)
                    {
                        warn!(
                            "upstream {}: backend {} is unhealthy: {why}",
                            up.name(),
                            backend.shown()
                        );
                    }
                }
            }
        }
    }
}
