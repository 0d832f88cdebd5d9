//! The rollout judge: given both sides' figures over a step, is the candidate worse than
//! the baseline, as well as not, or is it too soon to say ([`Verdict`])? Three questions,
//! each answered only when the data make it significant at the configured `confidence`:
//!
//! - **Failures** ([`error_rate`]): the candidate's failure rate may exceed the baseline's by
//!   `max_error_rate`. The excess is tested one-sided against that margin with the
//!   two-proportion z statistic (unpooled standard error, as for a difference with a
//!   non-zero margin): significant → fail; above the margin but not yet significant →
//!   inconclusive; at or below it → pass.
//! - **Latency** ([`latency`]): fail only when the candidate's p99 is over `max_latency_ratio`
//!   times the baseline's *and* the candidate's latencies are significantly higher as a
//!   whole (Mann-Whitney U, one-sided, normal approximation with the tie correction, on the
//!   bounded samples each side keeps). Kayenta judges latency with the same rank test: it
//!   assumes no distribution, and a few slow outliers alone do not make it significant.
//! - **Match rate** ([`match_rate`], the mirror step): comparisons that matched, noise taken
//!   off, against `min_match_rate`, by a one-sided test of one proportion.
//!
//! [`judge`] combines them: any fail fails, else any inconclusive holds, else pass.

use std::cmp::Ordering;

/// What the judge says of a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The candidate is not worse: advance (or promote at the last step).
    Pass,
    /// The candidate is significantly worse: roll back or pause.
    Fail(String),
    /// Too little data, or a difference not yet significant: hold the step.
    Inconclusive(String),
}

impl Verdict {
    /// `pass`, `fail` or `inconclusive`, as `GET /rollouts/ROUTE/analysis` says it.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail(_) => "fail",
            Verdict::Inconclusive(_) => "inconclusive",
        }
    }

    /// Why, in words (empty for a pass).
    pub fn reason(&self) -> &str {
        match self {
            Verdict::Pass => "",
            Verdict::Fail(why) | Verdict::Inconclusive(why) => why,
        }
    }
}

/// The limits a step is judged against (`rollout.judge`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// How much the candidate's failure rate may exceed the baseline's (0.01: 1 point).
    pub max_error_rate: f64,
    /// The candidate's p99 over the baseline's at most.
    pub max_latency_ratio: f64,
    /// The share of mirror comparisons that must match (mirror step).
    pub min_match_rate: f64,
    /// A difference counts when significant at this level (0.98).
    pub confidence: f64,
}

/// One side's figures over a step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Side {
    pub requests: u64,
    /// 5xx answers, connect errors, timeouts, failing gRPC statuses.
    pub failures: u64,
    /// A bounded sample of its latencies, in seconds.
    pub latencies: Vec<f64>,
}

impl Side {
    pub fn failure_rate(&self) -> f64 {
        match self.requests {
            0 => 0.0,
            n => self.failures as f64 / n as f64,
        }
    }

    /// The 99th percentile of the sample (nearest rank); 0 for an empty sample.
    pub fn p99(&self) -> f64 {
        percentile(&self.latencies, 0.99)
    }
}

/// The `q` quantile of `values` by nearest rank; 0 when empty.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(Ordering::Equal));
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The standard normal distribution's cumulative probability at `z`.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// The one-sided p-value of a z statistic: the chance of one this high by chance alone.
fn upper_p(z: f64) -> f64 {
    1.0 - normal_cdf(z)
}

/// The candidate's failures against the baseline's, with `margin` allowed.
pub fn error_rate(baseline: &Side, candidate: &Side, limits: &Limits) -> Verdict {
    let (pb, pc) = (baseline.failure_rate(), candidate.failure_rate());
    let excess = pc - pb;
    if excess <= limits.max_error_rate {
        return Verdict::Pass;
    }
    let (nb, nc) = (
        baseline.requests.max(1) as f64,
        candidate.requests.max(1) as f64,
    );
    let se = (pb * (1.0 - pb) / nb + pc * (1.0 - pc) / nc).sqrt();
    let significant = match se > 0.0 {
        true => upper_p((excess - limits.max_error_rate) / se) < 1.0 - limits.confidence,
        // Every request of both sides failed or none did: the excess is exact.
        false => true,
    };
    let figures = format!(
        "candidate fails {:.2}% against the baseline's {:.2}% (allowed +{:.2} points)",
        pc * 100.0,
        pb * 100.0,
        limits.max_error_rate * 100.0
    );
    match significant {
        true => Verdict::Fail(figures),
        false => Verdict::Inconclusive(format!("{figures}, not yet significant")),
    }
}

/// Mann-Whitney U's one-sided p-value that `candidate`'s values are stochastically higher
/// than `baseline`'s (normal approximation with the tie correction). 1 when either sample
/// is empty.
pub fn mann_whitney_higher(baseline: &[f64], candidate: &[f64]) -> f64 {
    let (n1, n2) = (candidate.len(), baseline.len());
    if n1 == 0 || n2 == 0 {
        return 1.0;
    }
    let mut all: Vec<(f64, bool)> = candidate
        .iter()
        .map(|&v| (v, true))
        .chain(baseline.iter().map(|&v| (v, false)))
        .collect();
    all.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(Ordering::Equal));
    // Average ranks over ties; the tie term Σ(t³ - t) for the variance.
    let mut rank_sum = 0.0;
    let mut ties = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        rank_sum += all[i..=j].iter().filter(|(_, c)| *c).count() as f64 * rank;
        i = j + 1;
    }
    let (n1, n2) = (n1 as f64, n2 as f64);
    let n = n1 + n2;
    let u = rank_sum - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if variance <= 0.0 {
        return 1.0;
    }
    // Continuity correction towards the mean.
    let z = (u - mean - 0.5) / variance.sqrt();
    upper_p(z)
}

/// The candidate's latency against the baseline's.
pub fn latency(baseline: &Side, candidate: &Side, limits: &Limits) -> Verdict {
    let (pb, pc) = (baseline.p99(), candidate.p99());
    if pb <= 0.0 || pc <= pb * limits.max_latency_ratio {
        return Verdict::Pass;
    }
    let p = mann_whitney_higher(&baseline.latencies, &candidate.latencies);
    let figures = format!(
        "candidate p99 {:.1} ms is {:.2}× the baseline's {:.1} ms (allowed {:.2}×)",
        pc * 1000.0,
        pc / pb,
        pb * 1000.0,
        limits.max_latency_ratio
    );
    match p < 1.0 - limits.confidence {
        true => Verdict::Fail(format!("{figures}; rank test p = {p:.4}")),
        false => {
            Verdict::Inconclusive(format!("{figures}, rank test not significant (p = {p:.3})"))
        }
    }
}

/// Mirror comparisons: `matched` of `compared` (noise already taken off) against
/// `min_match_rate`.
pub fn match_rate(matched: u64, compared: u64, limits: &Limits) -> Verdict {
    if compared == 0 {
        return Verdict::Inconclusive("no comparison yet".into());
    }
    let rate = matched as f64 / compared as f64;
    let floor = limits.min_match_rate;
    if rate >= floor {
        return Verdict::Pass;
    }
    let se = (floor * (1.0 - floor) / compared as f64).sqrt();
    let significant = se == 0.0 || upper_p((floor - rate) / se) < 1.0 - limits.confidence;
    let figures = format!(
        "{:.2}% of {compared} comparisons match (at least {:.2}% wanted)",
        rate * 100.0,
        floor * 100.0
    );
    match significant {
        true => Verdict::Fail(figures),
        false => Verdict::Inconclusive(format!("{figures}, not yet significant")),
    }
}

/// A share step: failures, then latency. Any fail fails; else any inconclusive holds.
pub fn judge(baseline: &Side, candidate: &Side, limits: &Limits) -> Verdict {
    combine([
        error_rate(baseline, candidate, limits),
        latency(baseline, candidate, limits),
    ])
}

/// Any fail (the first), else any inconclusive (the first), else pass.
pub fn combine(verdicts: impl IntoIterator<Item = Verdict>) -> Verdict {
    let mut held = None;
    for v in verdicts {
        match v {
            Verdict::Fail(_) => return v,
            Verdict::Inconclusive(_) if held.is_none() => held = Some(v),
            _ => {}
        }
    }
    held.unwrap_or(Verdict::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_error_rate: 0.01,
        max_latency_ratio: 1.25,
        min_match_rate: 0.99,
        confidence: 0.98,
    };

    fn side(requests: u64, failures: u64, latencies: Vec<f64>) -> Side {
        Side {
            requests,
            failures,
            latencies,
        }
    }

    /// `n` latencies spread evenly from `low` to `high` seconds.
    fn spread(n: usize, low: f64, high: f64) -> Vec<f64> {
        (0..n)
            .map(|i| low + (high - low) * i as f64 / (n - 1) as f64)
            .collect()
    }

    #[test]
    fn the_normal_distribution_is_right_where_tables_say() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-12);
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-4);
        assert!((normal_cdf(-2.054) - 0.02).abs() < 1e-4);
    }

    #[test]
    fn a_candidate_failing_ten_percent_fails_and_a_close_one_passes() {
        let baseline = side(1000, 2, vec![]);
        let bad = side(1000, 100, vec![]);
        assert!(matches!(
            error_rate(&baseline, &bad, &LIMITS),
            Verdict::Fail(_)
        ));
        let close = side(1000, 8, vec![]);
        assert_eq!(error_rate(&baseline, &close, &LIMITS), Verdict::Pass);
        // 3 of 50 against 0 of 50: above the margin, not yet significant.
        let few = error_rate(&side(50, 0, vec![]), &side(50, 3, vec![]), &LIMITS);
        assert!(matches!(few, Verdict::Inconclusive(_)), "{few:?}");
    }

    #[test]
    fn the_rank_test_sees_a_shift_and_not_a_same_distribution() {
        let base = spread(500, 0.010, 0.020);
        let same = spread(500, 0.010, 0.020);
        assert!(mann_whitney_higher(&base, &same) > 0.4);
        let slower = spread(500, 0.014, 0.030);
        assert!(mann_whitney_higher(&base, &slower) < 1e-6);
        // Faster is not "higher".
        assert!(mann_whitney_higher(&slower, &base) > 0.99);
        // All tied: no evidence either way.
        assert_eq!(mann_whitney_higher(&[0.01; 10], &[0.01; 10]), 1.0);
    }

    #[test]
    fn latency_fails_only_on_a_high_p99_with_a_significant_shift() {
        let base = side(500, 0, spread(500, 0.010, 0.020));
        let slower = side(500, 0, spread(500, 0.014, 0.030));
        assert!(matches!(latency(&base, &slower, &LIMITS), Verdict::Fail(_)));
        // The same body with three slow outliers: p99 is high, the ranks are not.
        let mut outliers = spread(500, 0.010, 0.020);
        for v in outliers.iter_mut().take(6) {
            *v = 0.5;
        }
        let outliers = side(500, 0, outliers);
        assert!(matches!(
            latency(&base, &outliers, &LIMITS),
            Verdict::Inconclusive(_)
        ));
        assert_eq!(latency(&base, &base.clone(), &LIMITS), Verdict::Pass);
    }

    #[test]
    fn the_match_rate_is_judged_against_its_floor() {
        assert_eq!(match_rate(995, 1000, &LIMITS), Verdict::Pass);
        assert!(matches!(match_rate(900, 1000, &LIMITS), Verdict::Fail(_)));
        assert!(matches!(
            match_rate(97, 100, &LIMITS),
            Verdict::Inconclusive(_)
        ));
        assert!(matches!(
            match_rate(0, 0, &LIMITS),
            Verdict::Inconclusive(_)
        ));
    }

    #[test]
    fn a_fail_outweighs_a_hold_and_a_hold_outweighs_a_pass() {
        let hold = Verdict::Inconclusive("h".into());
        let fail = Verdict::Fail("f".into());
        assert_eq!(combine([Verdict::Pass, hold.clone(), fail.clone()]), fail);
        assert_eq!(combine([Verdict::Pass, hold.clone()]), hold);
        assert_eq!(combine([Verdict::Pass, Verdict::Pass]), Verdict::Pass);
        assert_eq!(fail.label(), "fail");
        assert_eq!(hold.reason(), "h");
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }
}
