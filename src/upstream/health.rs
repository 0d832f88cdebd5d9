//! Active health checks, run as a Pingora background service. Each upstream with a
//! `health_check:` is probed every `interval`, all its backends at once, each probe bounded
//! by `timeout`. The probes themselves are pingora-load-balancing's `HttpHealthCheck`
//! (GET `path`, healthy on any 2xx) and `TcpHealthCheck` (connect); the streak counting
//! (`healthy_after`, `unhealthy_after`) is ours, so transitions update the balancer at
//! once and are logged.

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

use super::Upstream;
use crate::config::{BackendConfig, HealthCheckConfig, HealthCheckType, UpstreamConfig};

type Probe = Arc<dyn HealthCheck + Send + Sync>;

pub struct HealthChecker {
    upstreams: Vec<Arc<Upstream>>,
}

impl HealthChecker {
    pub fn new(upstreams: Vec<Arc<Upstream>>) -> Self {
        HealthChecker { upstreams }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut loops = JoinSet::new();
        for up in &self.upstreams {
            if up.config.health_check.is_some() {
                loops.spawn(check_forever(Arc::clone(up)));
            }
        }
        let _ = shutdown.changed().await;
        loops.abort_all();
    }
}

/// The probe of one backend; HTTP probes go out as its requests do (TLS, HTTP version).
fn probe_for(
    hc: &HealthCheckConfig,
    config: &UpstreamConfig,
    backend: &BackendConfig,
) -> Result<Probe, Box<Error>> {
    let label = backend.addr.to_string();
    let host = backend.host.as_deref().unwrap_or(&label);
    Ok(match hc.kind {
        HealthCheckType::Tcp => {
            let mut probe = TcpHealthCheck::new();
            probe.peer_template.options.connection_timeout = Some(hc.timeout);
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
            probe.validator = Some(Box::new(|resp| {
                if resp.status.is_success() {
                    Ok(())
                } else {
                    Error::e_explain(
                        ErrorType::HTTPStatus(resp.status.as_u16()),
                        "health check answer is not 2xx",
                    )
                }
            }));
            Arc::new(probe)
        }
    })
}

async fn check_forever(up: Arc<Upstream>) {
    let Some(hc) = up.config.health_check.clone() else {
        return;
    };
    let mut probes = Vec::new();
    for (b, config) in up.backends.iter().zip(&up.config.backends) {
        match (probe_for(&hc, &up.config, config), Backend::new(&b.label)) {
            (Ok(p), Ok(target)) => probes.push((p, target)),
            (Err(e), _) | (_, Err(e)) => {
                warn!(
                    "upstream {}: cannot set up health check of {}: {e}",
                    up.name(),
                    b.label
                );
                return;
            }
        }
    }
    let mut successes = vec![0u32; probes.len()];
    let mut failures = vec![0u32; probes.len()];
    let mut ticker = tokio::time::interval(hc.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let mut round = JoinSet::new();
        for (i, (probe, target)) in probes.iter().enumerate() {
            let (probe, target, timeout) = (Arc::clone(probe), target.clone(), hc.timeout);
            round.spawn(async move {
                let result = match tokio::time::timeout(timeout, probe.check(&target)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                (i, result)
            });
        }
        while let Some(joined) = round.join_next().await {
            let Ok((i, result)) = joined else { continue };
            let backend = &up.backends[i];
            match result {
                Ok(()) => {
                    failures[i] = 0;
                    successes[i] = successes[i].saturating_add(1);
                    if !backend.healthy()
                        && successes[i] >= hc.healthy_after
                        && up.set_healthy(i, true)
                    {
                        info!(
                            "upstream {}: backend {} is healthy again",
                            up.name(),
                            backend.label
                        );
                    }
                }
                Err(why) => {
                    successes[i] = 0;
                    failures[i] = failures[i].saturating_add(1);
                    if backend.healthy()
                        && failures[i] >= hc.unhealthy_after
                        && up.set_healthy(i, false)
                    {
                        warn!(
                            "upstream {}: backend {} is unhealthy: {why}",
                            up.name(),
                            backend.label
                        );
                    }
                }
            }
        }
    }
}
