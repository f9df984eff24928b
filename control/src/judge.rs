//! The judge: the policy that decides, from the stable and canary windows,
//! whether the canary is healthy, still unproven, or in breach.
//!
//! It exists so that the one decision that moves production traffic is a pure
//! function of two window snapshots, testable without a clock or a socket.
//! It never reads the clock, never blocks and allocates nothing except the
//! reason text of a breach.
//!
//! The controller runs it every ~10 ms. Evaluated that often, a naive
//! threshold on a small sample would revert a healthy canary sooner or later,
//! so every check asks for *evidence* of a breach, not just a bad point
//! estimate:
//! - the absolute error check uses the Wilson lower confidence bound of the
//!   canary's error rate, not the raw rate;
//! - the latency checks compare a lower confidence bound of the canary's p95
//!   with an upper confidence bound of stable's (distribution-free, from the
//!   binomial law of order statistics);
//! - the relative error check is a one-sided two-proportion z-test, backed by
//!   an exact binomial tail when too few errors are expected for the normal
//!   approximation, and it needs a minimum absolute difference too.
//!
//! In phase `shadowing` one more check reads the compared shadow pairs
//! ([`Judge::evaluate_shadow`]): how often the canary's status class
//! differed from stable's for the same request, which catches a canary
//! whose failures are not errors (a 404 where stable answers 200).
//!
//! The fast path is a run of canary errors in a row, which needs no canary
//! sample at all. A run is a breach when it is improbable given stable's
//! error rate: its length k must make `p^k ≤ 1e-8`, where `p` is the upper
//! confidence bound of stable's rate (so at least 3; with a spotless stable
//! at 900 req/s, 4 failures). A run of `max_consecutive_errors` is a breach
//! whatever stable's rate, unless stable is failing as much.

use std::fmt;
use std::time::Duration;

use serin_proxy::WindowSnapshot;

use crate::defaults;

/// The quantile that the latency checks are about.
const P95: f64 = 0.95;

/// The shortest run of canary errors that can be a breach on its own.
const MIN_IMPROBABLE_RUN: u32 = 3;

/// A run of canary errors is a breach when a canary as good as stable would
/// produce it with at most this probability. Checked once per canary
/// request at worst, so over a rollout of 100,000 canary requests a healthy
/// canary trips it with probability ≤ 0.1%.
const RUN_ALPHA: f64 = 1e-8;

/// Below this many expected canary errors (under "no difference"), the normal
/// approximation of the z-test is unreliable and the exact binomial tail
/// must agree with it.
const MIN_EXPECTED_ERRORS_FOR_Z: f64 = 5.0;

// === impl JudgePolicy ===

/// What the judge considers a breach. All fields are configurable; the
/// defaults, in [`crate::defaults`], come from the seed runbooks and from the
/// false-revert budget (≤ 1% of healthy rollouts).
#[derive(Clone, Debug, PartialEq)]
pub struct JudgePolicy {
    /// The rolling window both upstreams are judged over. Default
    /// [`defaults::WINDOW`].
    ///
    /// The judge only quotes it in reasons; the [`serin_proxy::Stats`] the
    /// controller reads must be built with the same window.
    pub window: Duration,
    /// Canary requests needed in the window before any verdict other than
    /// [`Verdict::Insufficient`]; also the stable requests needed before the
    /// relative checks run. Default [`defaults::MIN_REQUESTS`].
    pub min_requests: u64,
    /// Highest acceptable canary error rate, as a ratio in (0, 1]. Default
    /// [`defaults::MAX_ERROR_RATE`]. A breach needs the rate's lower
    /// confidence bound above it.
    pub max_error_rate: f64,
    /// Highest acceptable canary p95 latency (time to response headers).
    /// Default [`defaults::MAX_P95`].
    pub max_p95: Duration,
    /// Highest acceptable ratio of canary p95 to stable p95. Default
    /// [`defaults::MAX_P95_RATIO`].
    pub max_p95_ratio: f64,
    /// One-sided confidence required of every statistical check, in
    /// (0.5, 1). Default [`defaults::CONFIDENCE`], which says why it is so
    /// high.
    pub confidence: f64,
    /// The canary's error rate must exceed stable's by at least this much
    /// (absolute, ratio in [0, 1)) before the relative check can breach.
    /// Default [`defaults::MIN_ERROR_RATE_DIFFERENCE`].
    pub min_error_rate_difference: f64,
    /// Canary errors in a row that revert at once, whatever the window says,
    /// unless stable also has this many errors in a row (then the fault is
    /// shared, not the canary's). Shorter runs (3 or more) revert too when
    /// they are improbable given stable's error rate (see the module
    /// documentation): against a healthy stable, 4 failures. 0 disables both
    /// fast paths. Default [`defaults::MAX_CONSECUTIVE_ERRORS`].
    pub max_consecutive_errors: u32,
    /// Highest acceptable share of shadowed requests whose status class
    /// (2xx, 3xx, 4xx, 5xx) differs from stable's answer to the same
    /// request, as a ratio in (0, 1], in phase `shadowing`. A breach needs
    /// `min_requests` compared pairs and the share's lower confidence bound
    /// above it. Default [`defaults::MAX_SHADOW_MISMATCH_RATE`].
    pub max_shadow_mismatch_rate: f64,
}

impl Default for JudgePolicy {
    fn default() -> Self {
        Self {
            window: defaults::WINDOW,
            min_requests: defaults::MIN_REQUESTS,
            max_error_rate: defaults::MAX_ERROR_RATE,
            max_p95: defaults::MAX_P95,
            max_p95_ratio: defaults::MAX_P95_RATIO,
            confidence: defaults::CONFIDENCE,
            min_error_rate_difference: defaults::MIN_ERROR_RATE_DIFFERENCE,
            max_consecutive_errors: defaults::MAX_CONSECUTIVE_ERRORS,
            max_shadow_mismatch_rate: defaults::MAX_SHADOW_MISMATCH_RATE,
        }
    }
}

/// A policy value that makes no sense; the text names the key and says what
/// to write instead.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// A ratio outside its range.
    #[error("`judge.{key}` must be {range} (got {got}); {hint}")]
    OutOfRange {
        /// The config key, e.g. `max_error_rate`.
        key: &'static str,
        /// The allowed range, in words.
        range: &'static str,
        /// The value given.
        got: f64,
        /// What to write instead.
        hint: &'static str,
    },
    /// A duration or count that must be positive.
    #[error("`judge.{key}` must be greater than zero")]
    Zero {
        /// The config key, e.g. `window`.
        key: &'static str,
    },
}

impl JudgePolicy {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), PolicyError> {
        fn range(
            key: &'static str,
            got: f64,
            ok: bool,
            range: &'static str,
            hint: &'static str,
        ) -> Result<(), PolicyError> {
            if ok && got.is_finite() {
                Ok(())
            } else {
                Err(PolicyError::OutOfRange {
                    key,
                    range,
                    got,
                    hint,
                })
            }
        }
        if self.window.is_zero() {
            return Err(PolicyError::Zero { key: "window" });
        }
        if self.min_requests == 0 {
            return Err(PolicyError::Zero {
                key: "min_requests",
            });
        }
        if self.max_p95.is_zero() {
            return Err(PolicyError::Zero { key: "max_p95" });
        }
        for (key, r) in [
            ("max_error_rate", self.max_error_rate),
            ("max_shadow_mismatch_rate", self.max_shadow_mismatch_rate),
        ] {
            range(
                key,
                r,
                r > 0.0 && r <= 1.0,
                "between 0 and 1",
                "write 0.05 for 5%",
            )?;
        }
        let r = self.max_p95_ratio;
        range(
            "max_p95_ratio",
            r,
            r >= 1.0,
            "at least 1",
            "write 1.5 to allow a canary p95 50% above stable's",
        )?;
        let c = self.confidence;
        range(
            "confidence",
            c,
            c > 0.5 && c < 1.0,
            "strictly between 0.5 and 1",
            "write 0.999 for 99.9%",
        )?;
        let d = self.min_error_rate_difference;
        range(
            "min_error_rate_difference",
            d,
            (0.0..1.0).contains(&d),
            "between 0 and 1",
            "write 0.01 for one percentage point",
        )
    }
}

// === impl Verdict ===

/// What the judge concluded about the canary over the current window.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Enough canary traffic, and no check breached.
    Healthy,
    /// Too few canary requests in the window to judge (never a failure).
    Insufficient {
        /// Canary requests in the window.
        canary_requests: u64,
        /// Requests needed ([`JudgePolicy::min_requests`]).
        min_requests: u64,
    },
    /// The canary breached the policy and must be reverted.
    Breach {
        /// Human text with the numbers, e.g. `canary error rate 31.0% > 5.0%
        /// over 412 requests (window 10s)`.
        reason: String,
    },
}

impl Verdict {
    /// True for [`Verdict::Breach`].
    pub fn is_breach(&self) -> bool {
        matches!(self, Verdict::Breach { .. })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Healthy => f.write_str("canary healthy"),
            Verdict::Insufficient {
                canary_requests,
                min_requests,
            } => write!(
                f,
                "{canary_requests} of {min_requests} canary requests needed in the window"
            ),
            Verdict::Breach { reason } => f.write_str(reason),
        }
    }
}

// === impl Judge ===

/// The policy, validated, with its critical values computed once.
#[derive(Clone, Debug)]
pub struct Judge {
    policy: JudgePolicy,
    /// One-sided critical z for `policy.confidence`.
    z: f64,
    /// `1 - confidence`: the tail probability an exact test must beat.
    alpha: f64,
}

impl Judge {
    /// A judge applying `policy`, or the first thing wrong with it.
    pub fn new(policy: JudgePolicy) -> Result<Self, PolicyError> {
        policy.validate()?;
        let z = inverse_normal_cdf(policy.confidence);
        let alpha = 1.0 - policy.confidence;
        Ok(Self { policy, z, alpha })
    }

    /// The policy this judge applies.
    pub fn policy(&self) -> &JudgePolicy {
        &self.policy
    }

    /// Judges the canary against the policy and against stable over the same
    /// window. `*_consecutive` are the current runs of errors in a row.
    ///
    /// Checks, in order: consecutive canary errors (no minimum sample);
    /// then, with at least `min_requests` canary requests, absolute error
    /// rate and absolute p95; then, with at least `min_requests` stable
    /// requests too, error rate and p95 relative to stable.
    pub fn evaluate(
        &self,
        stable: &WindowSnapshot,
        canary: &WindowSnapshot,
        stable_consecutive: u32,
        canary_consecutive: u32,
    ) -> Verdict {
        let p = &self.policy;
        let max_run = p.max_consecutive_errors;
        if max_run > 0 && canary_consecutive >= max_run && stable_consecutive < max_run {
            return breach(format_args!(
                "{canary_consecutive} consecutive canary errors"
            ));
        }
        if max_run > 0
            && canary_consecutive >= MIN_IMPROBABLE_RUN
            && stable_consecutive < canary_consecutive
            && stable.requests >= p.min_requests
        {
            let stable_high = wilson_upper(stable.errors, stable.requests, self.z);
            if stable_high.powi(canary_consecutive as i32) <= RUN_ALPHA {
                return breach(format_args!(
                    "{canary_consecutive} consecutive canary errors while stable fails at most \
                     {:.2}% of requests ({}% confidence): chance below 1e-8",
                    stable_high * 100.0,
                    Percent(p.confidence),
                ));
            }
        }
        if canary.requests < p.min_requests {
            return Verdict::Insufficient {
                canary_requests: canary.requests,
                min_requests: p.min_requests,
            };
        }
        let window = Secs(p.window);

        // Absolute error rate: the rate's lower confidence bound must exceed
        // the limit, so 2 errors in 20 requests is not yet proof of > 5%.
        let rate = canary.error_rate();
        if rate > p.max_error_rate
            && wilson_lower(canary.errors, canary.requests, self.z) > p.max_error_rate
        {
            return breach(format_args!(
                "canary error rate {:.1}% > {:.1}% over {} requests (window {window})",
                rate * 100.0,
                p.max_error_rate * 100.0,
                canary.requests,
            ));
        }

        // Absolute p95: a low quantile bound of the canary must exceed it.
        let canary_p95 = canary.quantile(P95);
        let canary_p95_low = canary.quantile(quantile_bound(canary.requests, -self.z));
        if canary_p95_low > p.max_p95 {
            return breach(format_args!(
                "canary p95 {:.1}ms > {:.1}ms over {} requests (window {window})",
                millis(canary_p95),
                millis(p.max_p95),
                canary.requests,
            ));
        }

        if stable.requests < p.min_requests {
            return Verdict::Healthy;
        }

        // Relative error rate: one-sided two-proportion z-test.
        let stable_rate = stable.error_rate();
        if rate - stable_rate > p.min_error_rate_difference {
            let z = two_proportion_z(stable, canary);
            if z > self.z && self.exact_test_agrees(stable, canary) {
                return breach(format_args!(
                    "canary error rate {:.1}% significantly above stable {:.1}% \
                     (z={z:.1}, {}% confidence)",
                    rate * 100.0,
                    stable_rate * 100.0,
                    Percent(p.confidence),
                ));
            }
        }

        // Relative p95: canary's low bound against stable's high bound.
        let stable_p95 = stable.quantile(P95);
        let stable_p95_high = stable.quantile(quantile_bound(stable.requests, self.z));
        if canary_p95_low.as_secs_f64() > p.max_p95_ratio * stable_p95_high.as_secs_f64() {
            return breach(format_args!(
                "canary p95 {:.1}ms > {}× stable p95 {:.1}ms",
                millis(canary_p95),
                p.max_p95_ratio,
                millis(stable_p95),
            ));
        }

        Verdict::Healthy
    }

    /// The shadow's mismatch rule (phase `shadowing`): `pairs` are the
    /// compared shadow pairs in the window, `pairs.errors` those whose
    /// status classes differed. A breach needs `min_requests` pairs and the
    /// Wilson lower bound of the mismatch rate above
    /// `max_shadow_mismatch_rate`; otherwise `None`.
    pub fn evaluate_shadow(&self, pairs: &WindowSnapshot) -> Option<Verdict> {
        let p = &self.policy;
        let rate = pairs.error_rate();
        (pairs.requests >= p.min_requests
            && rate > p.max_shadow_mismatch_rate
            && wilson_lower(pairs.errors, pairs.requests, self.z) > p.max_shadow_mismatch_rate)
            .then(|| {
                breach(format_args!(
                    "canary status class differs from stable's in {:.1}% > {:.1}% of {} compared \
                     requests (window {})",
                    rate * 100.0,
                    p.max_shadow_mismatch_rate * 100.0,
                    pairs.requests,
                    Secs(p.window),
                ))
            })
    }

    /// When fewer than [`MIN_EXPECTED_ERRORS_FOR_Z`] canary errors are
    /// expected under "no difference", the z-test overstates significance
    /// (one error in 20 canary requests against a spotless stable gives
    /// z ≈ 7). There the exact binomial tail must be below `alpha` too.
    fn exact_test_agrees(&self, stable: &WindowSnapshot, canary: &WindowSnapshot) -> bool {
        let pooled =
            (stable.errors + canary.errors) as f64 / (stable.requests + canary.requests) as f64;
        let expected = pooled * canary.requests as f64;
        expected >= MIN_EXPECTED_ERRORS_FOR_Z
            || binomial_upper_tail(canary.requests, canary.errors, pooled) < self.alpha
    }
}

fn breach(reason: fmt::Arguments<'_>) -> Verdict {
    Verdict::Breach {
        reason: reason.to_string(),
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Formats a duration the way users write it: `10s`, `1.5s`, `250ms`.
pub(crate) struct Secs(pub(crate) Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d < Duration::from_secs(1) {
            write!(f, "{}ms", round3(millis(d)))
        } else {
            write!(f, "{}s", round3(d.as_secs_f64()))
        }
    }
}

/// Formats a ratio as a percentage without float noise: 0.999 → `99.9`.
struct Percent(f64);

impl fmt::Display for Percent {
    /// Up to 6 decimals, trailing zeros dropped: 0.999999 shows as 99.9999,
    /// never rounded up to a misleading 100.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = format!("{:.6}", self.0 * 100.0);
        f.write_str(text.trim_end_matches('0').trim_end_matches('.'))
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// === statistics ===

/// The Wilson score confidence interval of a proportion `k / n` at critical
/// value `z`: `(low, high)`.
fn wilson(k: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = k as f64 / n;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    let scale = 1.0 + z2 / n;
    (
        ((centre - spread) / scale).max(0.0),
        ((centre + spread) / scale).min(1.0),
    )
}

fn wilson_upper(k: u64, n: u64, z: f64) -> f64 {
    wilson(k, n, z).1
}

fn wilson_lower(k: u64, n: u64, z: f64) -> f64 {
    wilson(k, n, z).0
}

/// The quantile rank that bounds the p95 from below (`z < 0`) or above
/// (`z > 0`) with `n` samples: the number of samples below the true p95 is
/// Binomial(n, 0.95), so its normal bound gives a rank.
fn quantile_bound(n: u64, z: f64) -> f64 {
    let n = n.max(1) as f64;
    (P95 + z * (P95 * (1.0 - P95) / n).sqrt()).clamp(0.0, 1.0)
}

/// Pooled two-proportion z statistic with Yates' continuity correction,
/// positive when the canary is worse. The correction keeps the normal
/// approximation from overstating significance on small counts.
fn two_proportion_z(stable: &WindowSnapshot, canary: &WindowSnapshot) -> f64 {
    let (ns, nc) = (stable.requests as f64, canary.requests as f64);
    let pooled = (stable.errors + canary.errors) as f64 / (ns + nc);
    let se = (pooled * (1.0 - pooled) * (1.0 / ns + 1.0 / nc)).sqrt();
    if se == 0.0 {
        return 0.0;
    }
    let correction = 0.5 * (1.0 / ns + 1.0 / nc);
    (canary.error_rate() - stable.error_rate() - correction).max(0.0) / se
}

/// P(X ≥ k) for X ~ Binomial(n, p). Only called when `n * p` is small
/// (< 5), so `(1 - p)^n` does not underflow and the sum has at most `k`
/// terms.
fn binomial_upper_tail(n: u64, k: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let odds = p / (1.0 - p);
    let mut pmf = (1.0 - p).powf(n as f64);
    let mut below = pmf;
    for i in 0..(k - 1).min(n) {
        pmf *= (n - i) as f64 / (i + 1) as f64 * odds;
        below += pmf;
    }
    (1.0 - below).max(0.0)
}

/// The standard normal quantile (Acklam's rational approximation, relative
/// error below 1.2e-9), for `p` in (0, 1).
fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const P_LOW: f64 = 0.024_25;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

#[cfg(test)]
mod tests;
