//! The judge's sequential tests: e-detectors that accumulate evidence against
//! the canary look by look, with a false-alarm probability that holds over
//! every look, for as long as the canary runs.
//!
//! # The detector
//!
//! Each test is a Shiryaev–Roberts e-detector (Shin, Ramdas & Rinaldo,
//! "E-detectors", 2023) with α spending. For each alternative `k` of a small
//! grid it keeps `m_k`, updated at every look `t` as
//!
//! ```text
//! m_k ← (m_k + a_t) · L_k,t        M = Σ_k w_k m_k        breach when M ≥ 1
//! ```
//!
//! where `L_k,t` is the likelihood ratio of look `t`'s new outcomes under
//! alternative `k` against the null, and `a_t ≥ 0` is the α spent at look
//! `t`: a lump at the arm (`alpha` per step) plus `alpha_per_hour` spread
//! over time, fixed before the look's outcomes are seen (it depends on the
//! time and the request counts, and every `L_k,t` has conditional mean ≤ 1
//! given those, below). Let `A_t = Σ_{s≤t} a_s` and `Ā ≥ A_T` a bound on
//! what a step of length `T` spends. Then `Y_t = M_t + Ā − A_t` is a
//! non-negative supermartingale (`E[M_t | past] ≤ M_{t−1} + a_t`) starting at
//! `Ā`, and by Ville's inequality
//!
//! ```text
//! P(M_t ≥ 1 for some t ≤ T) ≤ P(Y_t ≥ 1 for some t ≤ T) ≤ Ā.
//! ```
//!
//! That is the false-alarm bound: per step, `alpha` plus `alpha_per_hour` for
//! each hour the step lasts, however often the judge looks. The detector
//! reads `m_k` as a sum over candidate change points `s` of `a_s` times the
//! likelihood ratio of everything since `s`: evidence in the canary's favour
//! gathered before a change shrinks the old terms but never the new ones,
//! so a canary that turns bad at any moment is detected as if a test had
//! started then (with the α spent since, instead of the arm's lump).
//!
//! # The likelihood ratios, and why each has mean ≤ 1 under its null
//!
//! - **Errors, relative to stable** (null: the canary fails no more often
//!   than stable at the same time). Looks are grouped into batches that
//!   close on the pooled request count and age alone, blind to which side
//!   each outcome came from (see [`Batch`]). Given a batch's
//!   requests on each side and its total errors `e`, under the null which
//!   errors are the canary's is a uniformly random draw: the canary's count
//!   `X` is hypergeometric, dominated in convex order by Binomial(e, ρ) with
//!   `ρ` the canary's share of the batch's requests (Hoeffding, 1963). So
//!   `θ^X / (θρ + 1 − ρ)^e`, the binomial likelihood ratio of an error rate
//!   ratio θ, has mean ≤ 1. A shared failure (both upstreams' errors rising
//!   together) leaves the canary's share of errors at ρ: it is no evidence.
//! - **Latency, relative to stable** (null: within a batch, the canary's
//!   latencies less [`LATENCY_FLOOR`] and divided by `min_latency_shift`
//!   are stochastically no larger than stable's; at equality, as likely as
//!   stable's to be any of the batch's values). Canary values are so
//!   shrunk (rounding down), then every
//!   batch value gets its mid-rank `v` in the pooled batch and the
//!   normal score `z = Φ⁻¹(v)`; the ratio for a shift λ is
//!   `Π_canary e^{λz} / μ_λ` where `μ_λ` is the pooled mean of `e^{λz}`. Each
//!   canary value is a draw without replacement from the pooled values;
//!   such draws are negatively associated (Joag-Dev & Proschan, 1983), so
//!   the product of the increasing factors has mean ≤ the product of their
//!   means, 1; a canary faster than the null's boundary only lowers the
//!   increasing factors. The test compares the whole distribution
//!   (stochastic order), not one quantile, and again only within the same
//!   time: a slowdown of a shared dependency moves both sides of every
//!   batch.
//! - **Absolute limits** (null: the canary's error rate ≤ `max_error_rate`;
//!   its share of latencies above `max_p95` ≤ 5%, i.e. its p95 ≤ `max_p95`).
//!   Bernoulli likelihood ratios of the canary's new outcomes against the
//!   limit, which have mean ≤ 1 for any rate at or below it.
//!
//! # Gates: minimum effects, and shared faults
//!
//! The latency test has its minimum effect in its null. The relative error
//! test breaches only if, over the same span on both sides, the canary's
//! error rate exceeds stable's by more than `min_error_rate_difference`;
//! the spans are the rolling windows, every closed batch since the arm, and
//! the test's excursion: the batches since its statistic was last below
//! 1% of the way to a breach, where its evidence comes from. A canary that
//! turns bad mid-step shows its whole difference over the excursion, where
//! the step (mostly healthy requests) and, at high traffic, the window
//! would dilute it under the minimum for hundreds of requests. A limit
//! test breaches only if the canary's rate or p95 over one of those spans
//! (for the error limit, its own excursion) is over the limit, and stable
//! has too little traffic to compare with or the matching relative test
//! crossed too: a dependency failing both is never the canary's fault. A
//! gate only ever withholds a breach, so the bound above still holds.
//!
//! # What the relative tests assume
//!
//! Both upstreams serve the same mix of requests at the same time, as a
//! random split gives. Overrides, cookies and sticky keys that send a
//! different mix to the canary can show as a difference; a shadowed
//! canary's copies (bodiless, idempotent requests only) are therefore held
//! to the limits and to their pairs' mismatch check, never compared with
//! all of stable's traffic.

use std::time::Duration;

use serin_proxy::WindowSnapshot;

/// Alternatives per test: the mixture's grid.
const GRID: usize = 5;

/// The mixture's weights over each grid, most on the middle alternatives
/// (the effects worth catching quickly), summing to 1.
const GRID_WEIGHTS: [f64; GRID] = [0.1, 0.2, 0.35, 0.2, 0.15];

/// Error rate ratios θ (canary over stable) of the relative error test:
/// 1% against 6% is θ = 6; 5% against 7.5%, θ = 1.5.
const ERROR_RATIOS: [f64; GRID] = [1.5, 3.0, 6.0, 12.0, 40.0];

/// Shifts λ of the normal scores in the relative latency test: a
/// log-normal latency with σ = 0.5 moved up by 1.2× is λ ≈ 0.36, by 1.5×
/// λ ≈ 0.81, by 2× λ ≈ 1.4 (before the minimum shift is taken off).
const LATENCY_SHIFTS: [f64; GRID] = [0.1, 0.2, 0.4, 0.8, 1.6];

/// Latency differences this small are never a regression: a canary 0.4 ms
/// slower (a copy of a shadowed request, a colder connection pool at a
/// small weight) is not worth a revert, whatever the ratio.
pub(super) const LATENCY_FLOOR: Duration = Duration::from_millis(1);

/// A batch closes once it holds this many outcomes, both sides together:
/// enough for a canary value's rank among them to mean something.
const BATCH_OUTCOMES: u64 = 16;

/// A batch that could not fill in this long (stable has almost no traffic)
/// is judged as it is, or dropped when one side has nothing.
const BATCH_MAX_SECONDS: f64 = 2.0;

/// The share of latencies a p95 may leave above it.
const P95_TAIL: f64 = 0.05;

// === impl Detector ===

/// One Shiryaev–Roberts e-detector with α spending over a grid of
/// alternatives (see the module documentation).
#[derive(Clone, Debug, Default)]
pub(super) struct Detector {
    /// `m_k` per alternative, in units where 1 is the breach.
    m: [f64; GRID],
    /// α spent since the arm (the arm's lump included).
    spent: f64,
}

impl Detector {
    /// Spends `a` of α: a new candidate change point of that weight.
    pub(super) fn spend(&mut self, a: f64) {
        for m in &mut self.m {
            *m += a;
        }
        self.spent += a;
    }

    /// Multiplies each alternative's statistic by `exp(log_ratio(k))`.
    fn update(&mut self, log_ratio: impl Fn(usize) -> f64) {
        for (k, m) in self.m.iter_mut().enumerate() {
            let ratio = log_ratio(k);
            // Callers never produce NaN; if one did, it is no evidence.
            if ratio.is_nan() {
                continue;
            }
            *m = (*m * ratio.exp()).min(f64::MAX);
        }
    }

    /// The mixture statistic `M`: a breach at 1.
    pub(super) fn statistic(&self) -> f64 {
        self.m.iter().zip(GRID_WEIGHTS).map(|(m, w)| m * w).sum()
    }

    /// True once the statistic crossed 1.
    pub(super) fn crossed(&self) -> bool {
        self.statistic() >= 1.0
    }

    /// The e-value against the α spent since the arm, as the reasons quote
    /// it: `M / spent` against its threshold `1 / spent`.
    pub(super) fn e_value(&self) -> (f64, f64) {
        let spent = self.spent.max(f64::MIN_POSITIVE);
        (self.statistic() / spent, 1.0 / spent)
    }

    /// Bernoulli evidence: `hits` of `n` outcomes against a null rate `p0`,
    /// alternatives from `alternative(k)` (each above `p0`).
    pub(super) fn observe_rate(
        &mut self,
        hits: u64,
        n: u64,
        p0: f64,
        alternative: impl Fn(usize) -> f64,
    ) {
        // A limit of 100% cannot be exceeded: nothing to test.
        if n == 0 || p0 >= 1.0 {
            return;
        }
        // A reader racing the writer can see a count ahead of the requests.
        let hits = hits.min(n);
        let (hits, misses) = (hits as f64, (n - hits) as f64);
        self.update(|k| {
            let q = alternative(k);
            hits * (q / p0).ln() + misses * ((1.0 - q) / (1.0 - p0)).ln()
        });
    }

    /// The relative error test on one closed batch.
    fn observe_error_share(&mut self, batch: &Batch) {
        let errors = batch.stable.errors + batch.canary.errors;
        let requests = batch.stable.requests + batch.canary.requests;
        if errors == 0 || requests == 0 {
            return;
        }
        let rho = batch.canary.requests as f64 / requests as f64;
        let canary_errors = batch.canary.errors.min(errors);
        let (canary_errors, errors) = (canary_errors as f64, errors as f64);
        self.update(|k| {
            let theta = ERROR_RATIOS[k];
            canary_errors * theta.ln() - errors * (theta * rho + 1.0 - rho).ln()
        });
    }

    /// The relative latency test on one closed batch: normal scores of the
    /// canary's pooled mid-ranks, tilted by each shift. The canary's
    /// latencies are first divided by `min_shift`, so the null is "no more
    /// than `min_shift` times slower than stable".
    fn observe_latency_ranks(&mut self, batch: &Batch, floor: Duration, min_shift: f64) {
        if batch.canary.requests == 0 || batch.stable.requests == 0 {
            return;
        }
        let canary = &batch.canary.shrunk(floor, min_shift);
        let mut log_ratio = [0.0; GRID];
        let mut pooled_mean = [0.0; GRID];
        let mut canary_score = 0.0;
        let mut canary_n = 0.0;
        let mut pooled_n = 0.0;
        let mut below = 0u64;
        let total: u64 = batch
            .stable
            .latency_buckets()
            .chain(canary.latency_buckets())
            .map(|(_, n)| n)
            .sum();
        let (stable, canary) = (batch.stable.latency_buckets(), canary.latency_buckets());
        if total == 0 {
            return;
        }
        for (bucket_stable, bucket_canary) in MergedBuckets::new(stable, canary) {
            let tied = bucket_stable + bucket_canary;
            let v = (below as f64 + tied as f64 / 2.0) / total as f64;
            let z = super::inverse_normal_cdf(v);
            for (k, mean) in pooled_mean.iter_mut().enumerate() {
                *mean += tied as f64 * (LATENCY_SHIFTS[k] * z).exp();
            }
            canary_score += bucket_canary as f64 * z;
            canary_n += bucket_canary as f64;
            pooled_n += tied as f64;
            below += tied;
        }
        for (k, ratio) in log_ratio.iter_mut().enumerate() {
            let mean = pooled_mean[k] / pooled_n;
            *ratio = LATENCY_SHIFTS[k] * canary_score - canary_n * mean.ln();
        }
        self.update(|k| log_ratio[k]);
    }
}

/// Walks two sparse `(bucket, count)` lists in bucket order, yielding the
/// counts of both at each bucket either has.
struct MergedBuckets<A: Iterator, B: Iterator> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<A, B> MergedBuckets<A, B>
where
    A: Iterator<Item = (usize, u64)>,
    B: Iterator<Item = (usize, u64)>,
{
    fn new(a: A, b: B) -> Self {
        Self {
            a: a.peekable(),
            b: b.peekable(),
        }
    }
}

impl<A, B> Iterator for MergedBuckets<A, B>
where
    A: Iterator<Item = (usize, u64)>,
    B: Iterator<Item = (usize, u64)>,
{
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        match (self.a.peek().copied(), self.b.peek().copied()) {
            (None, None) => None,
            (Some((i, n)), Some((j, m))) if i == j => {
                self.a.next();
                self.b.next();
                Some((n, m))
            }
            (Some((i, n)), Some((j, _))) if i < j => {
                self.a.next();
                Some((n, 0))
            }
            (Some((_, n)), None) => {
                self.a.next();
                Some((n, 0))
            }
            (_, Some((_, m))) => {
                self.b.next();
                Some((0, m))
            }
        }
    }
}

// === impl Batch ===

/// The outcomes of both upstreams gathered since the last closed batch: the
/// unit of the relative tests, so that canary and stable are always
/// compared over the same stretch of time.
///
/// A batch closes on its pooled outcome count and its age alone, never on
/// which side an outcome came from or what it was. Under a random split the
/// canary's outcomes are then a uniformly random subset of the batch's,
/// even when both sides drift together within it (a shared dependency
/// slowing down), which keeps the conditional nulls above exact. A rule
/// that waited for a canary outcome would close every batch on one, so the
/// canary's would be the batch's latest: under a shared slowdown, its
/// slowest.
#[derive(Clone, Debug, Default)]
pub(super) struct Batch {
    pub(super) stable: WindowSnapshot,
    pub(super) canary: WindowSnapshot,
    seconds: f64,
}

impl Batch {
    /// Adds one look's new outcomes; returns true when the batch is full.
    pub(super) fn add(
        &mut self,
        stable: &WindowSnapshot,
        canary: &WindowSnapshot,
        seconds: f64,
    ) -> bool {
        self.stable.merge(stable);
        self.canary.merge(canary);
        self.seconds += seconds;
        self.canary.requests + self.stable.requests >= BATCH_OUTCOMES
            || self.seconds >= BATCH_MAX_SECONDS
    }

    /// Feeds a full batch to the two relative tests and empties it.
    pub(super) fn close(&mut self, errors: &mut Detector, latency: &mut Detector, min_shift: f64) {
        errors.observe_error_share(self);
        latency.observe_latency_ranks(self, LATENCY_FLOOR, min_shift);
        *self = Batch::default();
    }
}

/// The p95 limit test's rate: the share of latencies allowed above `max_p95`.
pub(super) const fn p95_tail() -> f64 {
    P95_TAIL
}

/// The Bernoulli alternatives above a null rate `p0`: a third more, double,
/// four times, and half and most of the way to 1.
pub(super) fn rate_alternatives(p0: f64) -> impl Fn(usize) -> f64 {
    move |k| match k {
        0 => (1.3 * p0).min(p0 + (1.0 - p0) * 0.05),
        1 => (2.0 * p0).min(p0 + (1.0 - p0) * 0.15),
        2 => (4.0 * p0).min(p0 + (1.0 - p0) * 0.3),
        3 => p0 + (1.0 - p0) * 0.5,
        _ => p0 + (1.0 - p0) * 0.9,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serin_proxy::split::FastRng;
    use serin_proxy::{Stats, Target};
    use tokio::time::Instant;

    use super::*;

    /// A batch of `stable` and `canary` outcomes drawn from one law: a
    /// coarse latency (many ties) and a 20% error rate.
    fn null_batch(rng: &FastRng, stable: u64, canary: u64) -> Batch {
        let stats = Stats::new(1, Duration::from_secs(10), Instant::now());
        let now = Instant::now();
        for (target, n) in [(Target::Stable, stable), (Target::Canary, canary)] {
            for _ in 0..n {
                let draw = rng.next_u64();
                let latency = Duration::from_millis(1 + draw % 7);
                let error = (draw >> 32).is_multiple_of(5);
                stats.worker(0).upstream(target).record(now, latency, error);
            }
        }
        Batch {
            stable: stats.window_snapshot(Target::Stable, now),
            canary: stats.window_snapshot(Target::Canary, now),
            seconds: 0.0,
        }
    }

    #[test]
    fn under_the_null_every_ratio_averages_at_most_one() {
        let rng = FastRng::new(11);
        let draws = 4_000;
        let (mut errors, mut latency) = ([0.0; GRID], [0.0; GRID]);
        for i in 0..draws {
            let batch = null_batch(&rng, 16 + i % 5, 1 + i % 3);
            let (mut e, mut l) = (Detector::default(), Detector::default());
            e.spend(1.0);
            l.spend(1.0);
            e.observe_error_share(&batch);
            l.observe_latency_ranks(&batch, Duration::ZERO, 1.0);
            for k in 0..GRID {
                errors[k] += e.m[k] / draws as f64;
                latency[k] += l.m[k] / draws as f64;
            }
        }
        // Sampling noise is a few percent; a wrong normalisation (ties,
        // ranks, the pooled mean) is off by far more.
        for k in 0..GRID {
            assert!(errors[k] < 1.08, "errors, alternative {k}: {}", errors[k]);
            assert!(
                latency[k] < 1.08,
                "latency, alternative {k}: {}",
                latency[k]
            );
        }
    }

    #[test]
    fn a_slower_canary_gains_evidence_and_a_faster_one_loses_it() {
        let stats = Stats::new(1, Duration::from_secs(10), Instant::now());
        let now = Instant::now();
        for ms in 1..=16 {
            stats
                .worker(0)
                .upstream(Target::Stable)
                .record(now, Duration::from_millis(ms), false);
        }
        let stable = stats.window_snapshot(Target::Stable, now);
        let batch = |canary_ms: u64| {
            let stats = Stats::new(1, Duration::from_secs(10), Instant::now());
            stats.worker(0).upstream(Target::Canary).record(
                now,
                Duration::from_millis(canary_ms),
                false,
            );
            Batch {
                stable: stable.clone(),
                canary: stats.window_snapshot(Target::Canary, now),
                seconds: 0.0,
            }
        };
        let mut slow = Detector::default();
        slow.spend(1.0);
        slow.observe_latency_ranks(&batch(40), LATENCY_FLOOR, 1.2);
        let mut fast = Detector::default();
        fast.spend(1.0);
        fast.observe_latency_ranks(&batch(1), LATENCY_FLOOR, 1.2);
        assert!(slow.statistic() > 1.0 && fast.statistic() < 1.0);
    }

    #[test]
    fn counts_ahead_of_the_requests_and_a_limit_of_one_are_no_evidence() {
        // A reader racing the writer can see an error before its request.
        let mut d = Detector::default();
        d.spend(1.0);
        d.observe_rate(3, 2, 0.05, rate_alternatives(0.05));
        assert!(d.statistic().is_finite() && d.statistic() > 1.0);
        let mut limit = Detector::default();
        limit.spend(1.0);
        limit.observe_rate(10, 10, 1.0, rate_alternatives(1.0));
        assert_eq!(limit.statistic(), 1.0, "a 100% limit cannot be exceeded");
    }

    #[test]
    fn batches_close_on_pooled_counts_or_age_alone() {
        let empty = WindowSnapshot::default();
        let one = WindowSnapshot::from_buckets(1, 1, [(3, 1)]);
        let almost = BATCH_OUTCOMES - 1;
        let many = WindowSnapshot::from_buckets(almost, 0, [(3, almost)]);
        let mut batch = Batch::default();
        assert!(!batch.add(&many, &empty, 0.01));
        assert!(
            batch.add(&one, &empty, 0.01),
            "full without a canary outcome"
        );
        let mut mixed = Batch::default();
        assert!(!mixed.add(&many, &empty, 0.01));
        assert!(mixed.add(&empty, &one, 0.01), "either side fills it");
        let mut idle = Batch::default();
        assert!(!idle.add(&empty, &one, 1.0));
        assert!(idle.add(&empty, &empty, 1.0), "two seconds old");
    }
}
