//! The passive circuit breaker of one backend (`breaker:` on an upstream). Live traffic
//! reports each attempt's result: a connect error, a timeout or a 5xx answer is a failure.
//! After `failures` consecutive failures the circuit opens for `open`; when that period
//! ends, exactly one request is let through as a probe (half-open). Its success closes the
//! circuit; its failure opens it again for twice as long, up to `max_open`.
//!
//! The closed, failure-free path costs one atomic load per check and per report; the lock
//! is taken only on failures and while the circuit is open.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Mutex;
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
struct State {
    open_until: Option<Instant>,
    open_for: Duration,
    probing: bool,
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    /// Consecutive failures while closed.
    failures: AtomicU32,
    open: AtomicBool,
    state: Mutex<State>,
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
            state: Mutex::new(State {
                open_until: None,
                open_for: config.open,
                probing: false,
            }),
            config: config.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent: recover it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn circuit(&self, now: Instant) -> Circuit {
        if !self.open.load(Relaxed) {
            return Circuit::Closed;
        }
        let s = self.lock();
        match s.open_until {
            _ if s.probing => Circuit::HalfOpen,
            Some(until) if now < until => Circuit::Open(Some(until)),
            _ => Circuit::Open(None),
        }
    }

    /// Whether a request may be sent now (closed, or open with its period over and no
    /// probe out yet).
    pub fn allows(&self, now: Instant) -> bool {
        matches!(self.circuit(now), Circuit::Closed | Circuit::Open(None))
    }

    /// Claims the request about to be sent. `Some(true)`: it is the probe of an open
    /// circuit; `Some(false)`: an ordinary request; `None`: the circuit refuses it.
    pub fn admit(&self, now: Instant) -> Option<bool> {
        if !self.open.load(Relaxed) {
            return Some(false);
        }
        let mut s = self.lock();
        if !self.open.load(Relaxed) {
            return Some(false);
        }
        match s.open_until {
            _ if s.probing => None,
            Some(until) if now < until => None,
            _ => {
                s.probing = true;
                Some(true)
            }
        }
    }

    /// A probe that ended without a result (client gone): let another request probe.
    pub fn abandon_probe(&self) {
        self.lock().probing = false;
    }

    /// Records one attempt's result.
    pub fn report(&self, success: bool, now: Instant) -> Transition {
        if success {
            if !self.open.load(Relaxed) {
                if self.failures.load(Relaxed) != 0 {
                    self.failures.store(0, Relaxed);
                }
                return Transition::None;
            }
            let mut s = self.lock();
            if !s.probing {
                // A request admitted before the circuit opened: not the probe.
                return Transition::None;
            }
            s.probing = false;
            s.open_until = None;
            s.open_for = self.config.open;
            self.failures.store(0, Relaxed);
            self.open.store(false, Relaxed);
            return Transition::Closed;
        }
        let mut s = self.lock();
        if self.open.load(Relaxed) {
            if !s.probing {
                return Transition::None;
            }
            // The probe failed: open again, for twice as long.
            s.probing = false;
            s.open_for = (s.open_for * 2).min(self.config.max_open);
            let until = now + s.open_for;
            s.open_until = Some(until);
            return Transition::Opened(until);
        }
        let n = self.failures.fetch_add(1, Relaxed) + 1;
        if n < self.config.failures {
            return Transition::None;
        }
        let until = now + s.open_for;
        s.open_until = Some(until);
        self.open.store(true, Relaxed);
        self.failures.store(0, Relaxed);
        Transition::Opened(until)
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
