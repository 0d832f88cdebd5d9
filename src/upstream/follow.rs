//! The background work of each upstream (health checks, DNS lookups) follows the
//! configuration: [`each_upstream`] runs one task per upstream of the generation in force,
//! starts those of upstreams a reload brings and stops those of upstreams it replaced or
//! removed. What such a task learns lives in the backends' [`super::Learned`], so a task
//! started for an upstream's successor goes on from where the last one was.

use std::future::Future;
use std::sync::Arc;

use pingora_core::server::ShutdownWatch;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

use super::Upstream;

/// The upstreams of the configuration in force, as reloads change them.
pub type UpstreamsWatch = watch::Receiver<Arc<[Arc<Upstream>]>>;

/// Runs `task(upstream)` for every upstream it gives a task to, until `shutdown`.
pub async fn each_upstream<F, Fut>(
    mut upstreams: UpstreamsWatch,
    mut shutdown: ShutdownWatch,
    task: F,
) where
    F: Fn(&Arc<Upstream>) -> Option<Fut>,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    // The upstream each task works for (held, so its address stays its own).
    let mut running: Vec<(Arc<Upstream>, AbortHandle)> = Vec::new();
    loop {
        let now = upstreams.borrow_and_update().clone();
        running.retain(|(up, handle)| {
            let stays = now.iter().any(|u| Arc::ptr_eq(u, up));
            if !stays {
                handle.abort();
            }
            stays
        });
        for up in now.iter() {
            if running.iter().any(|(r, _)| Arc::ptr_eq(r, up)) {
                continue;
            }
            if let Some(work) = task(up) {
                running.push((Arc::clone(up), tasks.spawn(work)));
            }
        }
        tokio::select! {
            changed = upstreams.changed() => if changed.is_err() { break },
            _ = shutdown.changed() => break,
            // Finished tasks are reaped, so the set does not grow over many reloads.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
}
