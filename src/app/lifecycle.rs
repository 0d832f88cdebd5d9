//! Process lifecycle. Pingora owns the signals (SIGQUIT: hand the sockets to a new process
//! and stop; SIGTERM: graceful stop; SIGINT: fast stop); this service also listens to
//! SIGQUIT and SIGTERM (tokio delivers a signal to every listener) and marks the gateway
//! *draining* at once.
//!
//! Why: when Pingora finally shuts the proxy down, it closes idle keep-alive connections
//! immediately, racing any client that is sending its next request on one. It waits about
//! five seconds after SIGQUIT before doing so. While draining, every answer carries
//! `Connection: close`, so each busy client finishes its current request and reconnects —
//! to the new process on an upgrade — well before that moment.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};

/// Set once the process has been asked to stop or hand over.
#[derive(Default)]
pub struct Draining(AtomicBool);

impl Draining {
    pub fn is_set(&self) -> bool {
        self.0.load(Relaxed)
    }

    pub fn set(&self) {
        self.0.store(true, Relaxed);
    }
}

pub struct SignalWatch {
    draining: Arc<Draining>,
}

impl SignalWatch {
    pub fn new(draining: Arc<Draining>) -> Self {
        SignalWatch { draining }
    }
}

#[async_trait]
impl BackgroundService for SignalWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (Ok(mut quit), Ok(mut term)) =
            (signal(SignalKind::quit()), signal(SignalKind::terminate()))
        else {
            log::warn!("cannot watch SIGQUIT/SIGTERM: connections will be closed only at shutdown");
            return;
        };
        tokio::select! {
            _ = quit.recv() => log::info!("SIGQUIT: draining, answers now close their connections"),
            _ = term.recv() => log::info!("SIGTERM: draining, answers now close their connections"),
            _ = shutdown.changed() => {}
        }
        self.draining.set();
    }
}
