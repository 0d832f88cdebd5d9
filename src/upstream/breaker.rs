//! The passive circuit breaker of one backend (`breaker:` on an upstream). Live traffic
//! reports each attempt's result: a connect error, a timeout or a 5xx answer is a failure.
//! After `failures` consecutive failures the circuit opens for `open`; when that period
//! ends, exactly one request is let through as a probe (half-open). Its success closes the
//! circuit; its failure opens it again for twice as long, up to `max_open`.
//!
//! Checks never lock: the closed path costs one atomic load, an open circuit three (open,
//! probing, until when), and the one probe is claimed by compare-and-swap. The lock only
//! serialises transitions (a failure while closed, a probe's result).

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;

/// What the circuit allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    /// Open; `Some(at)` until then, `None` once the period ended and a probe may go.
    Open(Option<Instant>),
    /// A probe is in flight.
    HalfOpen,
}

impl Circuit {
    pub fn name(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open(_) => "open",
            Circuit::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    /// Consecutive failures while closed.
    failures: AtomicU32,
    open: AtomicBool,
    /// While open: when the period ends, as nanoseconds after `epoch`.
    open_until: AtomicU64,
    /// While open: a probe is out.
    probing: AtomicBool,
    /// The current open period (doubling after failed probes); held while transitioning.
    open_for: Mutex<Duration>,
    epoch: Instant,
}

/// How an attempt on a backend ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Ok,
    /// A 5xx answer, a reset or a timeout after connecting.
    Failed,
    /// The backend could not be reached: connect refused, timed out, no route.
    Unreachable,
}

/// What a reported result changed, for the upstream to rebuild its schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Opened(Instant),
    Closed,
}

impl Breaker {
    pub fn new(config: &BreakerConfig) -> Breaker {
        Breaker {
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            open_for: Mutex::new(config.open),
            config: config.clone(),
            epoch: Instant::now(),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// When the open period ends, if it has not yet at `now`.
    fn open_until(&self, now: Instant) -> Option<Instant> {
        let until = self.open_until.load(SeqCst);
        (self.nanos(now) < until).then(|| self.epoch + Duration::from_nanos(until))
    }

    pub fn circuit(&self, now: Instant) -> Circuit {
        if !self.open.load(SeqCst) {
            return Circuit::Closed;
        }
        if self.probing.load(SeqCst) {
            return Circuit::HalfOpen;
        }
        Circuit::Open(self.open_until(now))
    }

    /// Whether a request may be sent now (closed, or open with its period over and no
    /// probe out yet).
    pub fn allows(&self, now: Instant) -> bool {
        matches!(self.circuit(now), Circuit::Closed | Circuit::Open(None))
    }

    /// Claims the request about to be sent. `Some(true)`: it is the probe of an open
    /// circuit; `Some(false)`: an ordinary request; `None`: the circuit refuses it.
    pub fn admit(&self, now: Instant) -> Option<bool> {
        if !self.open.load(SeqCst) {
            return Some(false);
        }
        if self.open_until(now).is_some() {
            return None;
        }
        // The period is over: the first to flip `probing` is the probe.
        self.probing
            .compare_exchange(false, true, SeqCst, SeqCst)
            .ok()
            .map(|_| true)
    }

    /// A probe that ended without a result (client gone): let another request probe.
    pub fn abandon_probe(&self) {
        self.probing.store(false, SeqCst);
    }

    /// Opens (or reopens) the circuit for `open_for` from `now`.
    fn open_for(&self, open_for: Duration, now: Instant) -> Transition {
        let until = now + open_for;
        self.open_until.store(self.nanos(until), SeqCst);
        // After the new end is in place, so no request takes the old one for a free probe.
        self.probing.store(false, SeqCst);
        self.open.store(true, SeqCst);
        Transition::Opened(until)
    }

    /// Records one attempt's outcome, as this breaker counts it: an ejection breaker
    /// (`connect_only`) counts an unreachable backend as a failure and anything that
    /// answered (even a 5xx) as a success.
    pub fn report_attempt(&self, attempt: Attempt, now: Instant) -> Transition {
        let success = match (self.config.connect_only, attempt) {
            (true, Attempt::Unreachable) => false,
            (true, _) => true,
            (false, Attempt::Ok) => true,
            (false, _) => false,
        };
        self.report(success, now)
    }

    /// Whether only failed connects count.
    pub fn connect_only(&self) -> bool {
        self.config.connect_only
    }

    /// The failures in a row that open it.
    pub fn threshold(&self) -> u32 {
        self.config.failures
    }

    /// Records one attempt's result.
    pub fn report(&self, success: bool, now: Instant) -> Transition {
        if success {
            if !self.open.load(SeqCst) {
                if self.failures.load(SeqCst) != 0 {
                    self.failures.store(0, SeqCst);
                }
                return Transition::None;
            }
            let mut open_for = self.open_for.lock();
            if !self.open.load(SeqCst) || !self.probing.load(SeqCst) {
                // A request admitted before the circuit opened: not the probe.
                return Transition::None;
            }
            *open_for = self.config.open;
            self.failures.store(0, SeqCst);
            self.open.store(false, SeqCst);
            self.probing.store(false, SeqCst);
            return Transition::Closed;
        }
        let mut open_for = self.open_for.lock();
        if self.open.load(SeqCst) {
            if !self.probing.load(SeqCst) {
                return Transition::None;
            }
            // The probe failed: open again, for twice as long.
            *open_for = (*open_for * 2).min(self.config.max_open);
            return self.open_for(*open_for, now);
        }
        let n = self.failures.fetch_add(1, SeqCst) + 1;
        if n < self.config.failures {
            return Transition::None;
        }
        self.failures.store(0, SeqCst);
        self.open_for(*open_for, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(&BreakerConfig {
            failures: 3,
            open: Duration::from_secs(10),
            max_open: Duration::from_secs(30),
            connect_only: false,
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker();
        let t = Instant::now();
        assert_eq!(b.report(false, t), Transition::None);
        assert_eq!(b.report(false, t), Transition::None);
        assert_eq!(b.report(true, t), Transition::None);
        assert_eq!(b.report(false, t), Transition::None);
        assert_eq!(b.report(false, t), Transition::None);
        assert_eq!(
            b.report(false, t),
            Transition::Opened(t + Duration::from_secs(10))
        );
        assert!(!b.allows(t + Duration::from_secs(9)));
        assert_eq!(b.admit(t + Duration::from_secs(9)), None);
    }

    #[test]
    fn one_probe_then_close_or_double() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.report(false, t);
        }
        let t1 = t + Duration::from_secs(10);
        assert!(b.allows(t1));
        assert_eq!(b.admit(t1), Some(true));
        assert_eq!(b.admit(t1), None, "a second probe while one is out");
        assert_eq!(b.circuit(t1), Circuit::HalfOpen);
        // Probe fails: open for 20 s.
        assert_eq!(
            b.report(false, t1),
            Transition::Opened(t1 + Duration::from_secs(20))
        );
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(b.admit(t2), Some(true));
        // Fails again: 40 s capped at 30 s.
        assert_eq!(
            b.report(false, t2),
            Transition::Opened(t2 + Duration::from_secs(30))
        );
        let t3 = t2 + Duration::from_secs(30);
        assert_eq!(b.admit(t3), Some(true));
        assert_eq!(b.report(true, t3), Transition::Closed);
        assert_eq!(b.circuit(t3), Circuit::Closed);
        // Closed again with the base period restored.
        for _ in 0..3 {
            b.report(false, t3);
        }
        assert_eq!(
            b.circuit(t3),
            Circuit::Open(Some(t3 + Duration::from_secs(10)))
        );
    }

    #[test]
    fn abandoned_probe_frees_the_slot() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..3 {
            b.report(false, t);
        }
        let t1 = t + Duration::from_secs(11);
        assert_eq!(b.admit(t1), Some(true));
        b.abandon_probe();
        assert_eq!(b.admit(t1), Some(true));
    }
}
