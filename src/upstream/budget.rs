//! An upstream's retry budget (`retry_budget: 20%`): retries under way may be at most that
//! share of the requests in flight to the upstream (rounded down), plus a floor of
//! [`RETRY_FLOOR_PER_SECOND`] retries a second for when few requests are in flight (as
//! Envoy's retry budget keeps a minimum). A retry over the budget is not made — the
//! request fails with the attempt's error — and is counted in
//! `fanout_shed_total{reason="retry_budget"}`: an upstream that fails half its requests
//! then gets about `1 + share` times the client's requests, not `1 + retries` times.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use prometheus::IntCounter;

use crate::config::RETRY_FLOOR_PER_SECOND;

pub struct RetryBudget {
    share: f64,
    /// Retries under way (held by [`Retrying`]).
    retrying: AtomicUsize,
    /// The floor: tokens, refilled at [`RETRY_FLOOR_PER_SECOND`], at most that many.
    floor: Mutex<(f64, Instant)>,
    shed: IntCounter,
}

/// A retry the budget allowed; it counts as under way until dropped (the request's end).
pub struct Retrying(Arc<RetryBudget>);

impl Drop for Retrying {
    fn drop(&mut self) {
        self.0.retrying.fetch_sub(1, Relaxed);
    }
}

impl RetryBudget {
    pub fn new(share: f64, shed: IntCounter) -> RetryBudget {
        RetryBudget {
            share,
            retrying: AtomicUsize::new(0),
            floor: Mutex::new((RETRY_FLOOR_PER_SECOND, Instant::now())),
            shed,
        }
    }

    /// A retry for a request of an upstream with `inflight` requests under way, if the
    /// budget allows one; `None` (counted) if not.
    pub fn try_retry(self: &Arc<Self>, inflight: usize) -> Option<Retrying> {
        let allowed = (self.share * inflight as f64).floor() as usize;
        if self.retrying.load(Relaxed) < allowed || self.floor_token(Instant::now()) {
            self.retrying.fetch_add(1, Relaxed);
            return Some(Retrying(Arc::clone(self)));
        }
        self.shed.inc();
        None
    }

    fn floor_token(&self, now: Instant) -> bool {
        let mut f = self.floor.lock();
        let refill = now.saturating_duration_since(f.1).as_secs_f64() * RETRY_FLOOR_PER_SECOND;
        f.0 = (f.0 + refill).min(RETRY_FLOOR_PER_SECOND);
        f.1 = now;
        if f.0 >= 1.0 {
            f.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> IntCounter {
        IntCounter::new("shed", "shed").unwrap()
    }

    #[test]
    fn retries_are_a_share_of_the_load_plus_a_floor() {
        let b = Arc::new(RetryBudget::new(0.2, counter()));
        // The floor: three retries at once with nothing in flight.
        let floor: Vec<_> = (0..3).filter_map(|_| b.try_retry(1)).collect();
        assert_eq!(floor.len(), 3);
        assert!(b.try_retry(1).is_none());
        // With 100 requests in flight, 20 retries may be under way (3 already are).
        let more: Vec<_> = (0..30).filter_map(|_| b.try_retry(100)).collect();
        assert_eq!(more.len(), 17);
        drop(more);
        drop(floor);
        assert_eq!(b.retrying.load(Relaxed), 0);
        assert_eq!(b.shed.get(), 1 + 13);
    }
}
