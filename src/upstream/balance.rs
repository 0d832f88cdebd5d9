//! Backend selection algorithms. One entry point, [`Balancer::pick`], serves every
//! algorithm, takes the eligibility test (health, circuit, already tried) as an argument,
//! and takes no lock:
//!
//! - `round_robin` and `weighted` walk a precomputed *schedule* with an atomic cursor. For
//!   `weighted` the schedule is one period of nginx's smooth weighted round-robin (weights
//!   1:5 give `B B A B B B`-like spreads, never a burst), computed over the backends that are
//!   eligible when it is built, and rebuilt whenever a backend leaves or returns.
//! - `least_conn` scans the in-flight counters and takes the lowest `inflight / weight`,
//!   breaking ties in round-robin order.
//! - `consistent_hash` walks Pingora's Ketama ring from the request key's point; a backend
//!   that leaves moves only its own keys.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_load_balancing::selection::consistent::KetamaHashing;
use pingora_load_balancing::selection::{BackendIter, BackendSelection};
use pingora_load_balancing::Backend;

use crate::config::Balance;

/// The longest schedule kept; larger weight totals are scaled down to fit.
const MAX_SCHEDULE: u64 = 1 << 16;
/// Ring steps tried before falling back to a linear scan for an eligible backend.
const MAX_RING_STEPS: usize = 256;

pub struct Balancer {
    kind: Kind,
    cursor: AtomicUsize,
}

enum Kind {
    Schedule {
        weighted: bool,
        schedule: ArcSwap<Vec<u32>>,
    },
    LeastConn,
    Ketama {
        ring: Arc<KetamaHashing>,
        index: HashMap<SocketAddr, usize>,
    },
}

/// What the balancer needs to know of one backend.
pub trait Candidate {
    fn weight(&self) -> u32;
    fn inflight(&self) -> usize;
}

impl Balancer {
    pub fn new(balance: Balance, addrs: &[(SocketAddr, u32)]) -> Balancer {
        let kind = match balance {
            Balance::RoundRobin | Balance::Weighted => Kind::Schedule {
                weighted: balance == Balance::Weighted,
                schedule: ArcSwap::from_pointee(Vec::new()),
            },
            Balance::LeastConn => Kind::LeastConn,
            Balance::ConsistentHash => {
                let set: BTreeSet<Backend> = addrs
                    .iter()
                    .map(|(addr, weight)| Backend {
                        addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(*addr),
                        weight: *weight as usize,
                        ext: Default::default(),
                    })
                    .collect();
                Kind::Ketama {
                    ring: Arc::new(KetamaHashing::build(&set)),
                    index: addrs
                        .iter()
                        .enumerate()
                        .map(|(i, (a, _))| (*a, i))
                        .collect(),
                }
            }
        };
        Balancer {
            kind,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Rebuilds the schedule over the backends `eligible` accepts. Called at start and on
    /// every health or circuit transition (rare events), never per request.
    pub fn refresh<C: Candidate>(&self, backends: &[C], eligible: impl Fn(usize) -> bool) {
        if let Kind::Schedule { weighted, schedule } = &self.kind {
            let members: Vec<(u32, u32)> = (0..backends.len())
                .filter(|&i| eligible(i))
                .map(|i| (i as u32, if *weighted { backends[i].weight() } else { 1 }))
                .collect();
            schedule.store(Arc::new(smooth_wrr_schedule(&members)));
        }
    }

    /// Picks a backend index. `ok(i)` says whether backend `i` may be used now; `key` feeds
    /// consistent hashing. Returns `None` when no backend is acceptable.
    pub fn pick<C: Candidate>(
        &self,
        backends: &[C],
        key: &[u8],
        ok: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = backends.len();
        match &self.kind {
            Kind::Schedule { schedule, .. } => {
                let s = schedule.load();
                if !s.is_empty() {
                    let start = self.cursor.fetch_add(1, Relaxed);
                    for k in 0..s.len() {
                        let i = s[(start + k) % s.len()] as usize;
                        if ok(i) {
                            return Some(i);
                        }
                    }
                }
                // The schedule is stale or holds only unacceptable backends: scan.
                self.scan(n, &ok)
            }
            Kind::LeastConn => {
                let start = self.cursor.fetch_add(1, Relaxed);
                let mut best: Option<(usize, usize, u32)> = None;
                for k in 0..n {
                    let i = (start + k) % n;
                    if !ok(i) {
                        continue;
                    }
                    let (load, weight) = (backends[i].inflight(), backends[i].weight().max(1));
                    // load / weight < best_load / best_weight, compared without division.
                    let better = best.is_none_or(|(_, bl, bw)| {
                        (load as u128) * (bw as u128) < (bl as u128) * (weight as u128)
                    });
                    if better {
                        best = Some((i, load, weight));
                    }
                }
                best.map(|(i, _, _)| i)
            }
            Kind::Ketama { ring, index } => {
                let mut iter = ring.iter(key);
                for _ in 0..MAX_RING_STEPS {
                    let Some(b) = iter.next() else { break };
                    if let Some(&i) = b.addr.as_inet().and_then(|a| index.get(a)) {
                        if ok(i) {
                            return Some(i);
                        }
                    }
                }
                self.scan(n, &ok)
            }
        }
    }

    fn scan(&self, n: usize, ok: &impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.cursor.fetch_add(1, Relaxed);
        (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
    }
}

/// One period of nginx's smooth weighted round-robin over `(index, weight)` pairs: each
/// step adds every weight to its current value, picks the largest, and subtracts the
/// total from it. After `total` steps all current values are back at zero, so the period
/// repeats exactly; an atomic cursor over it gives the same sequence without a lock.
pub fn smooth_wrr_schedule(members: &[(u32, u32)]) -> Vec<u32> {
    if members.is_empty() {
        return Vec::new();
    }
    let g = members
        .iter()
        .fold(0u64, |g, &(_, w)| gcd(g, w as u64))
        .max(1);
    let mut weights: Vec<i64> = members
        .iter()
        .map(|&(_, w)| (w as u64 / g) as i64)
        .collect();
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    if total > MAX_SCHEDULE {
        for w in weights.iter_mut() {
            *w = ((*w as u64 * MAX_SCHEDULE / total).max(1)) as i64;
        }
    }
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; members.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..members.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(members[best].0);
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct B(u32, usize);
    impl Candidate for B {
        fn weight(&self) -> u32 {
            self.0
        }
        fn inflight(&self) -> usize {
            self.1
        }
    }

    fn addrs(ws: &[u32]) -> Vec<(SocketAddr, u32)> {
        ws.iter()
            .enumerate()
            .map(|(i, &w)| (SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)), w))
            .collect()
    }

    #[test]
    fn smooth_schedule_matches_nginx() {
        // nginx's documented example: weights 5, 1, 1 → a a b a c a a.
        let s = smooth_wrr_schedule(&[(0, 5), (1, 1), (2, 1)]);
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
        // 2:3 interleaves (b a b a b): no backend twice in a row but at the period seam;
        // a bursty scheme would give a a b b b.
        let s = smooth_wrr_schedule(&[(0, 2), (1, 3)]);
        assert_eq!(s, vec![1, 0, 1, 0, 1]);
        // 1:5 puts the light backend exactly once in every period of six.
        let s = smooth_wrr_schedule(&[(0, 1), (1, 5)]);
        assert_eq!(s.iter().filter(|&&b| b == 0).count(), 1);
        assert_eq!(s.len(), 6);
        // Weights are reduced by their gcd: 4:6 is the 2:3 period.
        assert_eq!(smooth_wrr_schedule(&[(0, 4), (1, 6)]).len(), 5);
    }

    #[test]
    fn round_robin_skips_ineligible() {
        let bs = [B(1, 0), B(1, 0), B(1, 0)];
        let b = Balancer::new(Balance::RoundRobin, &addrs(&[1, 1, 1]));
        b.refresh(&bs, |i| i != 1);
        let picks: Vec<_> = (0..4).map(|_| b.pick(&bs, b"", |_| true)).collect();
        assert_eq!(picks, vec![Some(0), Some(2), Some(0), Some(2)]);
        assert_eq!(b.pick(&bs, b"", |_| false), None);
    }

    #[test]
    fn least_conn_prefers_lowest_load_per_weight() {
        let bs = [B(1, 4), B(2, 6), B(1, 3)];
        let b = Balancer::new(Balance::LeastConn, &addrs(&[1, 2, 1]));
        assert_eq!(b.pick(&bs, b"", |_| true), Some(1));
        assert_eq!(b.pick(&bs, b"", |i| i != 1), Some(2));
    }

    #[test]
    fn ketama_is_stable_and_moves_only_lost_keys() {
        let a = addrs(&[1, 1, 1, 1]);
        let bs = [B(1, 0), B(1, 0), B(1, 0), B(1, 0)];
        let b = Balancer::new(Balance::ConsistentHash, &a);
        let keys: Vec<String> = (0..200).map(|i| format!("client-{i}")).collect();
        let before: Vec<_> = keys
            .iter()
            .map(|k| b.pick(&bs, k.as_bytes(), |_| true))
            .collect();
        let again: Vec<_> = keys
            .iter()
            .map(|k| b.pick(&bs, k.as_bytes(), |_| true))
            .collect();
        assert_eq!(before, again);
        let after: Vec<_> = keys
            .iter()
            .map(|k| b.pick(&bs, k.as_bytes(), |i| i != 2))
            .collect();
        for (x, y) in before.iter().zip(&after) {
            if *x != Some(2) {
                assert_eq!(x, y);
            } else {
                assert_ne!(*y, Some(2));
            }
        }
        assert!(before.iter().filter(|x| **x == Some(2)).count() > 10);
    }
}
