//! An upstream's adaptive concurrency limit (`concurrency:`): how many requests may be in
//! flight to it at once, a number that follows the upstream's latency, and the bounded
//! wait of the requests over it.
//!
//! **The algorithm** is the gradient controller of Envoy's adaptive concurrency filter
//! (after Netflix's concurrency-limits): the upstream's unloaded latency (`min_rtt`) is
//! measured by pinning the limit at `min` for a moment every ~30 s; in between, every
//! window of ~100 ms compares the window's median latency with it,
//! `gradient = (min_rtt + buffer) / sample` (clamped to 0.5..2), and sets
//! `limit = gradient × limit + √(gradient × limit)`. While the upstream answers as fast as
//! unloaded the limit grows; once it queues, its latency rises and the limit falls towards
//! the point where it is just busy. Why this one: an overloaded service usually slows
//! down long before it fails, and AIMD only backs off on failures (drops, timeouts), that
//! is after the queues have formed; and a baseline that is measured, not a long-term
//! average, cannot drift up under sustained load (Gradient2's known weakness). The limit
//! does not grow past twice the busiest in-flight count of the window (a quiet upstream
//! keeps the limit it earned, it does not inflate it).
//!
//! **Over the limit** a client request waits in a bounded queue for at most
//! `max_queue_wait` (at most `4 × max` of them, and 1,024, wait at once), then is shed (503 + Retry-After, `fanout_shed_total{reason=
//! "concurrency"}`). The queue is FIFO while it moves, and serves the newest first once its
//! oldest has waited half of `max_queue_wait` (adaptive LIFO, as in Facebook's Wangle): in
//! a standing overload the served requests do not all pay the whole wait. Mirror and
//! fallback copies never wait and never pass a waiting client (they are dropped first);
//! broadcast deliveries wait behind every client request, without a bound (the spool
//! holds them). Health checks, the admin listener and WebSocket tunnels are outside it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::oneshot;

use crate::config::ConcurrencyConfig;

/// How often the unloaded latency is measured again (less up to 15 % of jitter).
const MEASURE_EVERY: Duration = Duration::from_secs(30);
/// Samples that make a measurement of the unloaded latency; or [`MEASURE_LONGEST`] with
/// at least one.
const MEASURE_SAMPLES: usize = 20;
const MEASURE_LONGEST: Duration = Duration::from_secs(2);
/// A window of the gradient: at least this long with [`WINDOW_SAMPLES`] samples, or one
/// second with one.
const WINDOW: Duration = Duration::from_millis(100);
const WINDOW_SAMPLES: usize = 5;
const WINDOW_LONGEST: Duration = Duration::from_secs(1);
/// The smallest bound of the queue of waiting client requests.
const QUEUE_LEAST: usize = 1024;
/// Samples kept per window (more end it early).
const WINDOW_MAX: usize = 1024;
/// The latency over the unloaded one that is not a sign of queueing: a quarter of it, and
/// at least a millisecond (a backend answering in microseconds jitters by more).
const BUFFER_SHARE: f64 = 0.25;
const BUFFER_FLOOR: Duration = Duration::from_millis(1);

pub struct Limiter {
    config: ConcurrencyConfig,
    state: Mutex<State>,
    /// `fanout_upstream_concurrency_limit{upstream}`.
    gauge: IntGauge,
    /// `fanout_shed_total{upstream, reason="concurrency"}`.
    shed: IntCounter,
}

/// The request was refused: over the limit for longer than `max_queue_wait` (or at once,
/// for a copy or when the queue is full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shed;

/// A slot under the limit; released (and handed to the next waiter) when dropped.
pub struct Permit(Option<Arc<Limiter>>);

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(limiter) = self.0.take() {
            limiter.release();
        }
    }
}

impl Permit {
    /// A permit that was never handed over: its slot is still the limiter's.
    fn defuse(mut self) {
        self.0 = None;
    }
}

struct Waiter {
    since: Instant,
    tx: oneshot::Sender<Permit>,
}

enum Phase {
    /// Pinned at `min` while the unloaded latency is measured from attempts started
    /// `since` then.
    Measuring { since: Instant },
    /// Following the gradient against `min_rtt` until `until`, then measuring again.
    Following { min_rtt: Duration, until: Instant },
}

struct State {
    limit: f64,
    inflight: usize,
    /// Client requests waiting for a slot, oldest first.
    waiting: VecDeque<Waiter>,
    /// Broadcast deliveries waiting, served when no client waits.
    background: VecDeque<Waiter>,
    phase: Phase,
    /// Latencies (µs) of the current window or measurement.
    samples: Vec<u32>,
    window_start: Instant,
    /// The most requests in flight during the window.
    peak: usize,
    /// The last measured unloaded latency (for `/status`).
    min_rtt: Option<Duration>,
}

impl State {
    fn capacity(&self, min: usize) -> usize {
        match self.phase {
            Phase::Measuring { .. } => min,
            Phase::Following { .. } => self.limit as usize,
        }
    }
}

/// What `/status` shows of a limiter.
pub struct Snapshot {
    pub limit: usize,
    pub inflight: usize,
    pub waiting: usize,
    pub min_rtt: Option<Duration>,
    pub measuring: bool,
}

impl Limiter {
    pub fn new(config: &ConcurrencyConfig, gauge: IntGauge, shed: IntCounter) -> Limiter {
        let now = Instant::now();
        gauge.set(i64::from(config.min));
        Limiter {
            state: Mutex::new(State {
                limit: f64::from(config.min),
                inflight: 0,
                waiting: VecDeque::new(),
                background: VecDeque::new(),
                phase: Phase::Measuring { since: now },
                samples: Vec::new(),
                window_start: now,
                peak: 0,
                min_rtt: None,
            }),
            config: config.clone(),
            gauge,
            shed,
        }
    }

    pub fn config(&self) -> &ConcurrencyConfig {
        &self.config
    }

    /// Client requests that may wait at once: four times `max`, at least [`QUEUE_LEAST`].
    fn queue_bound(&self) -> usize {
        (4 * self.config.max as usize).max(QUEUE_LEAST)
    }

    fn min(&self) -> usize {
        self.config.min as usize
    }

    /// The wait a shed request was allowed, for `Retry-After` and logs.
    pub fn max_queue_wait(&self) -> Duration {
        self.config.max_queue_wait
    }

    /// A slot for a client request: at once if one is free and nobody waits, else after
    /// waiting at most `max_queue_wait` (counted as shed when none came).
    pub async fn acquire(self: &Arc<Self>) -> Result<Permit, Shed> {
        let rx = {
            let mut s = self.state.lock();
            if s.waiting.is_empty() && s.inflight < s.capacity(self.min()) {
                return Ok(self.grant(&mut s));
            }
            if self.config.max_queue_wait.is_zero() || s.waiting.len() >= self.queue_bound() {
                drop(s);
                self.shed.inc();
                return Err(Shed);
            }
            let (tx, rx) = oneshot::channel();
            s.waiting.push_back(Waiter {
                since: Instant::now(),
                tx,
            });
            rx
        };
        match tokio::time::timeout(self.config.max_queue_wait, rx).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                self.shed.inc();
                Err(Shed)
            }
        }
    }

    /// A slot for a mirror or fallback copy: only if one is free and no client waits
    /// (copies never queue; a refusal is counted as shed).
    pub fn try_acquire(self: &Arc<Self>) -> Result<Permit, Shed> {
        let mut s = self.state.lock();
        if s.waiting.is_empty() && s.inflight < s.capacity(self.min()) {
            return Ok(self.grant(&mut s));
        }
        drop(s);
        self.shed.inc();
        Err(Shed)
    }

    /// A slot for a broadcast delivery: after every client request that waits.
    pub async fn acquire_background(self: &Arc<Self>) -> Option<Permit> {
        let rx = {
            let mut s = self.state.lock();
            if s.waiting.is_empty()
                && s.background.is_empty()
                && s.inflight < s.capacity(self.min())
            {
                return Some(self.grant(&mut s));
            }
            let (tx, rx) = oneshot::channel();
            s.background.push_back(Waiter {
                since: Instant::now(),
                tx,
            });
            rx
        };
        rx.await.ok()
    }

    fn grant(self: &Arc<Self>, s: &mut State) -> Permit {
        s.inflight += 1;
        s.peak = s.peak.max(s.inflight);
        Permit(Some(Arc::clone(self)))
    }

    fn release(self: &Arc<Self>) {
        let mut s = self.state.lock();
        s.inflight = s.inflight.saturating_sub(1);
        self.fill(&mut s, Instant::now());
    }

    /// Hands free slots to waiters: clients first (adaptive LIFO), then deliveries.
    fn fill(self: &Arc<Self>, s: &mut State, now: Instant) {
        let half_wait = self.config.max_queue_wait / 2;
        while s.inflight < s.capacity(self.min()) {
            let stale = s
                .waiting
                .front()
                .is_some_and(|w| now.saturating_duration_since(w.since) > half_wait);
            let next = match stale {
                true => s.waiting.pop_back(),
                false => s.waiting.pop_front(),
            };
            let Some(waiter) = next.or_else(|| s.background.pop_front()) else {
                return;
            };
            if waiter.tx.is_closed() {
                continue; // it gave up waiting
            }
            let permit = self.grant(s);
            if let Err(permit) = waiter.tx.send(permit) {
                s.inflight -= 1;
                permit.defuse();
            }
        }
    }

    /// The latency of an attempt on this upstream that started at `started`: an answer
    /// (not a 5xx) or, `timed_out`, a timeout.
    pub fn sample(self: &Arc<Self>, started: Instant, timed_out: bool) {
        self.record(started, Instant::now(), timed_out);
    }

    fn record(self: &Arc<Self>, started: Instant, now: Instant, timed_out: bool) {
        let rtt = now.saturating_duration_since(started);
        let micros = rtt.as_micros().min(u128::from(u32::MAX)) as u32;
        let mut s = self.state.lock();
        match s.phase {
            Phase::Measuring { since } => {
                // Only attempts that started pinned at `min`, and only answers.
                if started < since || timed_out {
                    return;
                }
                s.samples.push(micros);
                let long = now.saturating_duration_since(since) >= MEASURE_LONGEST;
                if s.samples.len() >= MEASURE_SAMPLES || long {
                    let min_rtt = Duration::from_micros(u64::from(median(&mut s.samples)));
                    let jitter = 1.0 - 0.15 * crate::http::request_id::unit_random();
                    s.min_rtt = Some(min_rtt);
                    s.phase = Phase::Following {
                        min_rtt,
                        until: now + MEASURE_EVERY.mul_f64(jitter),
                    };
                    self.start_window(&mut s, now);
                    self.fill(&mut s, now);
                }
            }
            Phase::Following { min_rtt, until } => {
                if s.samples.len() < WINDOW_MAX {
                    s.samples.push(micros);
                }
                let age = now.saturating_duration_since(s.window_start);
                let full = (age >= WINDOW && s.samples.len() >= WINDOW_SAMPLES)
                    || age >= WINDOW_LONGEST
                    || s.samples.len() >= WINDOW_MAX;
                if !full {
                    return;
                }
                let sample = Duration::from_micros(u64::from(median(&mut s.samples)));
                s.limit = self.next_limit(s.limit, min_rtt, sample, s.peak);
                self.gauge.set(s.limit as i64);
                if now >= until {
                    s.phase = Phase::Measuring { since: now };
                    s.samples.clear();
                    self.gauge.set(self.config.min.into());
                } else {
                    self.start_window(&mut s, now);
                }
                self.fill(&mut s, now);
            }
        }
    }

    fn start_window(&self, s: &mut State, now: Instant) {
        s.samples.clear();
        s.window_start = now;
        s.peak = s.inflight;
    }

    /// The gradient step: the limit after a window whose median latency was `sample`.
    fn next_limit(&self, limit: f64, min_rtt: Duration, sample: Duration, peak: usize) -> f64 {
        let buffer = min_rtt.mul_f64(BUFFER_SHARE).max(BUFFER_FLOOR);
        let sample = sample.max(Duration::from_micros(1));
        let gradient = ((min_rtt + buffer).as_secs_f64() / sample.as_secs_f64()).clamp(0.5, 2.0);
        let mut next = gradient * limit + (gradient * limit).sqrt();
        // A limit the traffic did not use is not raised further.
        next = next.min(limit.max(2.0 * peak as f64));
        next.clamp(f64::from(self.config.min), f64::from(self.config.max))
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.state.lock();
        Snapshot {
            limit: s.capacity(self.min()),
            inflight: s.inflight,
            waiting: s.waiting.len() + s.background.len(),
            min_rtt: s.min_rtt,
            measuring: matches!(s.phase, Phase::Measuring { .. }),
        }
    }
}

/// The median of `v` (reordered), 0 when empty.
fn median(v: &mut [u32]) -> u32 {
    if v.is_empty() {
        return 0;
    }
    let mid = v.len() / 2;
    *v.select_nth_unstable(mid).1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(min: u32, max: u32, wait_ms: u64) -> Arc<Limiter> {
        let config = ConcurrencyConfig {
            min,
            max,
            max_queue_wait: Duration::from_millis(wait_ms),
        };
        let gauge = IntGauge::new("limit", "limit").expect("gauge");
        let shed = IntCounter::new("shed", "shed").expect("counter");
        Arc::new(Limiter::new(&config, gauge, shed))
    }

    /// Ends the measuring phase with samples of `rtt`.
    fn measure(l: &Arc<Limiter>, rtt: Duration) {
        let start = Instant::now();
        for _ in 0..MEASURE_SAMPLES {
            l.record(start, start + rtt, false);
        }
        assert!(!l.snapshot().measuring);
    }

    #[test]
    fn the_gradient_grows_a_fast_upstream_and_shrinks_a_queueing_one() {
        let l = limiter(4, 1000, 10);
        let ms = Duration::from_millis;
        // As fast as unloaded, fully used: the limit grows (x1.25 + sqrt).
        let grown = l.next_limit(20.0, ms(20), ms(20), 20);
        assert!(grown > 25.0 && grown <= 40.0, "{grown}");
        // Not used: it does not grow past twice what was in flight.
        assert_eq!(l.next_limit(20.0, ms(20), ms(20), 3), 20.0);
        // Twice as slow as the baseline plus its buffer: it falls, halving at most.
        let fallen = l.next_limit(20.0, ms(20), ms(100), 20);
        assert!((10.0..14.0).contains(&fallen), "{fallen}");
        // Never below min nor above max.
        assert_eq!(l.next_limit(4.0, ms(1), ms(500), 4), 4.0);
        assert_eq!(l.next_limit(900.0, ms(20), ms(1), 900), 1000.0);
    }

    #[test]
    fn measuring_pins_the_limit_at_min_then_follows() {
        let l = limiter(4, 1000, 10);
        assert!(l.snapshot().measuring);
        assert_eq!(l.snapshot().limit, 4);
        // An attempt that started before the measurement does not count.
        let since = match l.state.lock().phase {
            Phase::Measuring { since } => since,
            Phase::Following { .. } => unreachable!("a new limiter measures"),
        };
        if let Some(before) = since.checked_sub(Duration::from_millis(1)) {
            l.record(before, since + Duration::from_millis(5), false);
            assert!(l.snapshot().measuring);
        }
        assert!(l.snapshot().measuring);
        measure(&l, Duration::from_millis(20));
        let s = l.snapshot();
        assert!(!s.measuring);
        assert_eq!(s.min_rtt, Some(Duration::from_millis(20)));
    }

    #[tokio::test]
    async fn over_the_limit_requests_wait_then_are_shed_and_copies_never_wait() {
        let l = limiter(2, 10, 30);
        let a = l.acquire().await.expect("slot 1");
        let _b = l.acquire().await.expect("slot 2");
        // Full: a copy is refused at once, a client waits and gets the slot a release frees.
        assert!(l.try_acquire().is_err());
        let waiting = {
            let l = Arc::clone(&l);
            tokio::spawn(async move { l.acquire().await })
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while l.snapshot().waiting == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("queued");
        drop(a);
        let handed = waiting.await.expect("task");
        assert!(handed.is_ok(), "the released slot went to the waiter");
        // Still full: the next client is shed after max_queue_wait, not before.
        let t = Instant::now();
        assert_eq!(l.acquire().await.err(), Some(Shed));
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(30), "{waited:?}");
        assert_eq!(l.shed.get(), 2);
        assert_eq!(l.snapshot().inflight, 2);
        drop(handed);
        assert_eq!(l.snapshot().inflight, 1);
    }

    #[tokio::test]
    async fn deliveries_wait_behind_clients() {
        let l = limiter(1, 10, 1000);
        let held = l.acquire().await.expect("slot");
        let delivery = {
            let l = Arc::clone(&l);
            tokio::spawn(async move { l.acquire_background().await.is_some() })
        };
        let client = {
            let l = Arc::clone(&l);
            tokio::spawn(async move {
                while l.snapshot().waiting == 0 {
                    tokio::task::yield_now().await;
                }
                l.acquire().await.is_ok()
            })
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while l.snapshot().waiting < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("both queued");
        drop(held);
        // The client came second but is served first; the delivery gets the slot after.
        assert!(client.await.expect("task"));
        assert!(delivery.await.expect("task"));
        assert_eq!(l.snapshot().inflight, 0);
    }
}
