//! What a rollout counts over a step, per side, on the request path without a lock: the
//! requests, the failures, and a bounded uniform sample of the latencies ([`Reservoir`],
//! Vitter's algorithm R on atomics), which the judge's rank test and p99 read. A step's
//! window is replaced, not cleared, when the step changes, so a request that straddles the
//! change counts in the window it started in.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::judge::Side;
use crate::keys;

/// Latencies kept per side: enough for the rank test to see a shift of a few percent,
/// 16 KiB per side whatever the traffic.
pub const SAMPLE: usize = 2048;

/// A uniform sample of at most [`SAMPLE`] values from a stream of any length: value `i`
/// (counting from 0) takes a free slot while there is one, then replaces a random slot with
/// probability `SAMPLE / (i + 1)`. Slots are atomics: adding never waits.
pub struct Reservoir {
    seen: AtomicU64,
    /// Latencies in microseconds.
    slots: Box<[AtomicU64]>,
}

impl Default for Reservoir {
    fn default() -> Reservoir {
        Reservoir {
            seen: AtomicU64::new(0),
            slots: (0..SAMPLE).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Reservoir {
    pub fn add(&self, micros: u64) {
        let i = self.seen.fetch_add(1, Relaxed);
        let slot = match usize::try_from(i) {
            Ok(i) if i < SAMPLE => i,
            _ => {
                let j = keys::random_u64() % (i + 1);
                match usize::try_from(j) {
                    Ok(j) if j < SAMPLE => j,
                    _ => return,
                }
            }
        };
        self.slots[slot].store(micros, Relaxed);
    }

    /// How many values were offered.
    pub fn seen(&self) -> u64 {
        self.seen.load(Relaxed)
    }

    /// The sample, in seconds.
    pub fn values(&self) -> Vec<f64> {
        let n = usize::try_from(self.seen()).map_or(SAMPLE, |n| n.min(SAMPLE));
        self.slots[..n]
            .iter()
            .map(|s| s.load(Relaxed) as f64 / 1e6)
            .collect()
    }
}

/// One side's counts over a step.
#[derive(Default)]
pub struct Counts {
    requests: AtomicU64,
    failures: AtomicU64,
    latencies: Reservoir,
}

impl Counts {
    /// One request's outcome: `failed` for a 5xx, a connect error, a timeout or a failing
    /// gRPC status.
    pub fn record(&self, failed: bool, micros: u64) {
        self.requests.fetch_add(1, Relaxed);
        if failed {
            self.failures.fetch_add(1, Relaxed);
        }
        self.latencies.add(micros);
    }

    /// The figures the judge reads.
    pub fn side(&self) -> Side {
        Side {
            requests: self.requests.load(Relaxed),
            failures: self.failures.load(Relaxed),
            latencies: self.latencies.values(),
        }
    }
}

/// Both sides of one step.
#[derive(Default)]
pub struct Window {
    pub baseline: Counts,
    pub candidate: Counts,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_stream_is_kept_whole() {
        let r = Reservoir::default();
        for v in 1..=10 {
            r.add(v * 1000);
        }
        let mut values = r.values();
        values.sort_by(|a, b| a.total_cmp(b));
        assert_eq!(
            values,
            (1..=10).map(|v| v as f64 / 1000.0).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_long_stream_is_sampled_uniformly_and_bounded() {
        let r = Reservoir::default();
        let n = 200_000u64;
        for v in 0..n {
            r.add(v);
        }
        let values = r.values();
        assert_eq!(values.len(), SAMPLE);
        assert_eq!(r.seen(), n);
        // Uniform over 0..n: the sample's mean near n/2 and a quarter of it in each quarter.
        let mean = values.iter().sum::<f64>() / values.len() as f64 * 1e6;
        assert!((mean / n as f64 - 0.5).abs() < 0.05, "mean {mean}");
        let first_quarter = values.iter().filter(|v| **v * 1e6 < n as f64 / 4.0).count();
        assert!((400..640).contains(&first_quarter), "{first_quarter}");
    }

    #[test]
    fn counts_become_the_judges_figures() {
        let w = Window::default();
        for i in 0..100 {
            w.candidate.record(i % 10 == 0, 20_000);
            w.baseline.record(false, 10_000);
        }
        let (b, c) = (w.baseline.side(), w.candidate.side());
        assert_eq!((b.requests, b.failures), (100, 0));
        assert_eq!((c.requests, c.failures), (100, 10));
        assert_eq!(c.p99(), 0.02);
        let limits = super::super::judge::Limits {
            max_error_rate: 0.01,
            max_latency_ratio: 1.25,
            min_match_rate: 0.99,
            confidence: 0.98,
        };
        assert!(matches!(
            super::super::judge::judge(&b, &c, &limits),
            super::super::judge::Verdict::Fail(_)
        ));
    }

    #[test]
    fn concurrent_adds_lose_nothing_of_the_counts() {
        let w = std::sync::Arc::new(Window::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let w = std::sync::Arc::clone(&w);
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        w.candidate.record(i % 100 == 0, i);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let side = w.candidate.side();
        assert_eq!((side.requests, side.failures), (40_000, 400));
        assert_eq!(side.latencies.len(), SAMPLE);
    }
}
