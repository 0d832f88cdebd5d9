//! Fallback routes (`fallback: [b, c]` on a proxy route, the "go-conductor" pattern): the
//! request goes to the route's upstream and to every fallback at once. The fallbacks are the
//! copies of [`crate::mirror`] in capture mode (their answers kept in memory up to
//! `fallback_max_body`); this module picks and sends the answer the client gets when the
//! primary fails: the first successful fallback, in order of arrival.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use http::header;
use pingora_error::Result;
use pingora_proxy::Session;
use prometheus::IntCounter;
use tokio::sync::{mpsc, watch};

use crate::config::RouteConfig;
use crate::forwarding;
use crate::mirror::Captured;

/// The response header naming the upstream that answered.
pub const HEADER: &str = "x-fanout-upstream";

/// A route's fallback copies in flight, bounded by `fallback_max_inflight`.
pub struct Budget {
    inflight: AtomicUsize,
    max: usize,
    /// `fanout_fallback_skipped_total`: requests that ran without fallbacks.
    pub skipped: IntCounter,
}

impl Budget {
    pub fn new(max: usize, skipped: IntCounter) -> Arc<Budget> {
        Arc::new(Budget {
            inflight: AtomicUsize::new(0),
            max,
            skipped,
        })
    }

    /// Takes `n` slots, all or none (then the skip is counted).
    pub fn take(self: &Arc<Self>, n: usize) -> Option<Vec<Slot>> {
        if self.inflight.fetch_add(n, Relaxed) + n > self.max {
            self.inflight.fetch_sub(n, Relaxed);
            self.skipped.inc();
            return None;
        }
        Some((0..n).map(|_| Slot(Arc::clone(self))).collect())
    }
}

/// What keeps one request's fallback copies in check: their slots in the route's budget,
/// and the signal that their answers are no longer wanted (the sender, in [`Fallbacks`]).
pub struct Leash {
    pub slots: Vec<Slot>,
    pub wanted: watch::Receiver<()>,
}

impl Leash {
    pub fn new(slots: Vec<Slot>) -> (Leash, watch::Sender<()>) {
        let (tx, wanted) = watch::channel(());
        (Leash { slots, wanted }, tx)
    }
}

/// One fallback copy's place in its route's budget, given back when the copy ends.
pub struct Slot(Arc<Budget>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}

/// The fallback answers of one request, one per fallback copy (`None`: that one failed).
pub struct Fallbacks {
    answers: mpsc::UnboundedReceiver<Option<Captured>>,
    pending: usize,
    /// While held, the copies wait for their answers; dropped (the primary's answer was
    /// chosen, or the request ended), they stop reading and let their connections go.
    wanted: Option<watch::Sender<()>>,
}

impl Fallbacks {
    pub fn new(
        answers: mpsc::UnboundedReceiver<Option<Captured>>,
        pending: usize,
        wanted: watch::Sender<()>,
    ) -> Self {
        Fallbacks {
            answers,
            pending,
            wanted: Some(wanted),
        }
    }

    /// The primary's answer is the one: the copies' answers are no longer wanted.
    pub fn release(&mut self) {
        self.wanted = None;
    }

    /// The first answer that is not a 5xx, waiting for each copy to answer, fail or time out.
    pub async fn first_success(&mut self) -> Option<Captured> {
        while self.pending > 0 {
            self.pending -= 1;
            match self.answers.recv().await? {
                Some(c) if !c.header.status.is_server_error() => return Some(c),
                _ => continue,
            }
        }
        None
    }
}

/// Sends a fallback's answer to the client; returns its status. `name` is the answering
/// upstream, put in [`HEADER`].
pub async fn send(
    session: &mut Session,
    answer: Captured,
    route: Option<&RouteConfig>,
    request_id: &str,
    name: &str,
) -> Result<u16> {
    let Captured {
        mut header, body, ..
    } = answer;
    let status = header.status.as_u16();
    forwarding::response(&mut header, route, request_id)?;
    header.remove_header(&header::TRANSFER_ENCODING);
    header.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    header.insert_header(HEADER, name)?;
    // The primary's connection state is unknown after its failure: do not reuse it.
    session.as_downstream_mut().set_keepalive(None);
    session
        .write_response_header(Box::new(header), body.is_empty())
        .await?;
    if !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(status)
}
