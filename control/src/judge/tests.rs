use std::time::Duration;

use serin_proxy::{Stats, Target, WindowSnapshot};
use tokio::time::Instant;

use super::*;

/// A window of `requests` canary-side outcomes, the first `errors` of which
/// failed, with latencies from `latency(i)`.
fn window(requests: u64, errors: u64, latency: impl Fn(u64) -> Duration) -> WindowSnapshot {
    let now = Instant::now();
    let stats = Stats::new(1, Duration::from_secs(10), now);
    let upstream = stats.worker(0);
    for i in 0..requests {
        upstream
            .upstream(Target::Canary)
            .record(now, latency(i), i < errors);
    }
    stats.window_snapshot(Target::Canary, now)
}

fn ms(n: u64) -> impl Fn(u64) -> Duration {
    move |_| Duration::from_millis(n)
}

fn judge() -> Judge {
    Judge::new(JudgePolicy::default()).unwrap()
}

fn reason(v: Verdict) -> String {
    match v {
        Verdict::Breach { reason } => reason,
        other => panic!("expected a breach, got {other:?}"),
    }
}

#[test]
fn absolute_error_rate_breach() {
    let stable = window(1000, 2, ms(20));
    let canary = window(412, 128, ms(20));
    let r = reason(judge().evaluate(&stable, &canary, 0, 0));
    assert_eq!(
        r,
        "canary error rate 31.1% > 5.0% over 412 requests (window 10s)"
    );
}

#[test]
fn absolute_error_rate_breach_without_stable_traffic() {
    let canary = window(40, 20, ms(20));
    let r = reason(judge().evaluate(&WindowSnapshot::default(), &canary, 0, 0));
    assert!(
        r.starts_with("canary error rate 50.0% > 5.0% over 40"),
        "{r}"
    );
}

#[test]
fn two_errors_in_twenty_is_not_yet_proof_of_five_percent() {
    let canary = window(20, 2, ms(20));
    assert_eq!(
        judge().evaluate(&WindowSnapshot::default(), &canary, 0, 0),
        Verdict::Healthy
    );
}

#[test]
fn absolute_p95_breach() {
    let stable = window(1000, 0, ms(1400));
    let canary = window(100, 0, ms(1600));
    let r = reason(judge().evaluate(&stable, &canary, 0, 0));
    assert!(r.starts_with("canary p95 1"), "{r}");
    assert!(
        r.ends_with("ms > 1000.0ms over 100 requests (window 10s)"),
        "{r}"
    );
}

#[test]
fn relative_error_breach() {
    let stable = window(2000, 4, ms(20));
    let canary = window(412, 17, ms(20));
    let r = reason(judge().evaluate(&stable, &canary, 0, 0));
    assert!(
        r.starts_with("canary error rate 4.1% significantly above stable 0.2% (z="),
        "{r}"
    );
    assert!(r.ends_with(", 99.9999% confidence)"), "{r}");
}

#[test]
fn relative_error_needs_the_minimum_difference() {
    // 1.6% against 1.0% is significant at this volume, but under one point.
    let stable = window(100_000, 1_000, ms(20));
    let canary = window(50_000, 800, ms(20));
    assert_eq!(judge().evaluate(&stable, &canary, 0, 0), Verdict::Healthy);
}

#[test]
fn one_error_in_twenty_against_a_spotless_stable_is_not_significant() {
    // The z statistic is ~7 here; the exact binomial tail says otherwise.
    let stable = window(1000, 0, ms(20));
    let canary = window(20, 1, ms(20));
    assert_eq!(judge().evaluate(&stable, &canary, 0, 0), Verdict::Healthy);
}

#[test]
fn relative_p95_breach() {
    let stable = window(1000, 0, ms(210));
    let canary = window(200, 0, ms(500));
    let r = reason(judge().evaluate(&stable, &canary, 0, 0));
    assert!(r.starts_with("canary p95 "), "{r}");
    assert!(r.contains("ms > 1.5× stable p95 "), "{r}");
}

#[test]
fn relative_checks_need_stable_traffic() {
    let stable = window(19, 0, ms(10));
    let canary = window(200, 8, ms(500));
    assert_eq!(judge().evaluate(&stable, &canary, 0, 0), Verdict::Healthy);
}

#[test]
fn min_requests_guard() {
    // Slow and failing, but 19 requests and no run of errors long enough
    // for the fast path: no verdict yet.
    let stable = window(1000, 0, ms(20));
    let canary = window(19, 19, ms(5000));
    assert_eq!(
        judge().evaluate(&stable, &canary, 0, 2),
        Verdict::Insufficient {
            canary_requests: 19,
            min_requests: 20
        }
    );
    assert_eq!(
        Verdict::Insufficient {
            canary_requests: 7,
            min_requests: 20
        }
        .to_string(),
        "7 of 20 canary requests needed in the window"
    );
}

#[test]
fn consecutive_errors_revert_without_a_sample() {
    let stable = window(1000, 0, ms(20));
    let canary = window(12, 12, ms(20));
    let r = reason(judge().evaluate(&stable, &canary, 0, 12));
    assert_eq!(r, "12 consecutive canary errors");
}

#[test]
fn a_short_run_reverts_when_stable_is_clean() {
    // 9,000 stable requests without an error: stable fails at most ~0.25%
    // (99.9999% confidence), so 4 canary failures in a row have a chance
    // below 1e-8; 3 do not (0.25%³ ≈ 1.6e-8).
    let stable = window(9000, 0, ms(20));
    let canary = window(4, 4, ms(20));
    let r = reason(judge().evaluate(&stable, &canary, 0, 4));
    assert!(
        r.starts_with("4 consecutive canary errors while stable fails at most 0.2"),
        "{r}"
    );
    let canary = window(3, 3, ms(20));
    assert!(!judge().evaluate(&stable, &canary, 0, 3).is_breach());
}

#[test]
fn a_short_run_is_not_enough_against_a_flaky_stable() {
    // Stable fails 10%: runs of 9 happen by chance; only the fixed limit
    // of 10 reverts.
    let stable = window(2000, 200, ms(20));
    let canary = window(60, 9, ms(20));
    assert!(!judge().evaluate(&stable, &canary, 0, 9).is_breach());
    let canary = window(60, 10, ms(20));
    let r = reason(judge().evaluate(&stable, &canary, 0, 10));
    assert_eq!(r, "10 consecutive canary errors");
}

#[test]
fn a_short_run_needs_a_stable_sample() {
    // Without enough stable requests there is no rate to compare with.
    let stable = window(10, 0, ms(20));
    let canary = window(6, 6, ms(20));
    assert!(!judge().evaluate(&stable, &canary, 0, 6).is_breach());
}

#[test]
fn consecutive_errors_ignored_when_stable_fails_in_a_row_too() {
    let stable = window(1000, 30, ms(20));
    let canary = window(12, 12, ms(20));
    assert!(!judge().evaluate(&stable, &canary, 30, 12).is_breach());
}

#[test]
fn consecutive_fast_path_can_be_disabled() {
    let policy = JudgePolicy {
        max_consecutive_errors: 0,
        ..JudgePolicy::default()
    };
    let canary = window(12, 12, ms(20));
    let verdict = Judge::new(policy)
        .unwrap()
        .evaluate(&WindowSnapshot::default(), &canary, 0, 12);
    assert!(!verdict.is_breach());
}

#[test]
fn healthy_identical_canary() {
    let latency = |i: u64| Duration::from_millis(10 + i % 90);
    let stable = window(5000, 50, latency);
    let canary = window(500, 5, latency);
    assert_eq!(judge().evaluate(&stable, &canary, 1, 1), Verdict::Healthy);
}

#[test]
fn policy_validation_names_the_key() {
    let bad = JudgePolicy {
        max_error_rate: 5.0,
        ..JudgePolicy::default()
    };
    assert_eq!(
        Judge::new(bad).unwrap_err().to_string(),
        "`judge.max_error_rate` must be between 0 and 1 (got 5); write 0.05 for 5%"
    );
    let bad = JudgePolicy {
        confidence: 1.0,
        ..JudgePolicy::default()
    };
    assert!(Judge::new(bad)
        .unwrap_err()
        .to_string()
        .starts_with("`judge.confidence` must be strictly between 0.5 and 1"));
    let bad = JudgePolicy {
        window: Duration::ZERO,
        ..JudgePolicy::default()
    };
    assert_eq!(
        Judge::new(bad).unwrap_err().to_string(),
        "`judge.window` must be greater than zero"
    );
}

#[test]
fn statistics_helpers() {
    assert!((inverse_normal_cdf(0.999) - 3.090_232).abs() < 1e-5);
    assert!((inverse_normal_cdf(0.95) - 1.644_854).abs() < 1e-5);
    assert!((inverse_normal_cdf(0.001) + 3.090_232).abs() < 1e-5);
    // P(X >= 2) for Binomial(20, 0.01) = 1 - 0.99^20 - 20 * 0.01 * 0.99^19.
    let exact = 1.0 - 0.99f64.powi(20) - 0.2 * 0.99f64.powi(19);
    assert!((binomial_upper_tail(20, 2, 0.01) - exact).abs() < 1e-12);
    assert_eq!(binomial_upper_tail(20, 0, 0.01), 1.0);
    assert!(wilson_lower(0, 100, 3.09) == 0.0);
    assert!(wilson_lower(50, 100, 3.09) < 0.5);
    assert_eq!(Secs(Duration::from_secs(10)).to_string(), "10s");
    assert_eq!(Secs(Duration::from_millis(1500)).to_string(), "1.5s");
    assert_eq!(Secs(Duration::from_millis(250)).to_string(), "250ms");
    assert_eq!(Percent(0.999).to_string(), "99.9");
}

// === simulation ===

/// splitmix64: a tiny seeded generator, enough for simulations.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// A stream of requests that each fail with probability `p`, drawn with
/// geometric gaps so that its cost is per error, not per request.
struct Outcomes {
    log_q: f64,
    /// Successes still to come before the next error.
    gap: u64,
    /// Current run of errors in a row.
    run: u32,
}

impl Outcomes {
    fn new(p: f64, rng: &mut Rng) -> Self {
        let mut o = Self {
            log_q: (1.0 - p).ln(),
            gap: 0,
            run: 0,
        };
        o.gap = o.draw_gap(rng);
        o
    }

    fn draw_gap(&self, rng: &mut Rng) -> u64 {
        (rng.unit().ln() / self.log_q).floor() as u64
    }

    /// Serves `n` requests; returns how many failed.
    fn serve(&mut self, n: u64, rng: &mut Rng) -> u64 {
        let mut left = n;
        let mut errors = 0;
        while left > 0 {
            if self.gap >= left {
                self.gap -= left;
                self.run = 0;
                break;
            }
            if self.gap > 0 {
                self.run = 0;
            }
            left -= self.gap + 1;
            errors += 1;
            self.run += 1;
            self.gap = self.draw_gap(rng);
        }
        errors
    }
}

/// One rollout at `rps` requests per second, stable failing with
/// probability `ps` and the canary with `pc`: steps 5, 25, 50 and 100%
/// with a 60 s hold each, the window sliding in 100 ms slices, judged every
/// `every` slices. Counts only, no latencies. Returns the weight and reason
/// of the revert, if any.
fn simulate_errors(
    judge: &Judge,
    seed: u64,
    rps: u64,
    (ps, pc): (f64, f64),
    every: usize,
) -> Option<(f64, String)> {
    const SLICE_MS: u64 = 100;
    const SLICES: usize = 100; // a 10 s window
    let mut rng = Rng(seed);
    let mut stable_out = Outcomes::new(ps, &mut rng);
    let mut canary_out = Outcomes::new(pc, &mut rng);
    let mut ring = [(0u64, 0u64, 0u64, 0u64); SLICES];
    let (mut stable, mut canary) = (WindowSnapshot::default(), WindowSnapshot::default());
    let mut share = 0.0;
    let mut slice = 0usize;
    for weight in [0.05, 0.25, 0.5, 1.0] {
        for _ in 0..(60_000 / SLICE_MS) {
            let total = rps * SLICE_MS / 1000;
            share += total as f64 * weight;
            let nc = share.floor() as u64;
            share -= nc as f64;
            let ns = total - nc;
            let (es, ec) = (
                stable_out.serve(ns, &mut rng),
                canary_out.serve(nc, &mut rng),
            );
            let old = std::mem::replace(&mut ring[slice % SLICES], (ns, es, nc, ec));
            stable.requests = stable.requests + ns - old.0;
            stable.errors = stable.errors + es - old.1;
            canary.requests = canary.requests + nc - old.2;
            canary.errors = canary.errors + ec - old.3;
            slice += 1;
            if slice.is_multiple_of(every) {
                let v = judge.evaluate(&stable, &canary, stable_out.run, canary_out.run);
                if let Verdict::Breach { reason } = v {
                    return Some((weight, reason));
                }
            }
        }
    }
    None
}

#[test]
fn identical_canary_is_rarely_reverted_over_whole_rollouts() {
    // Every 100 ms is ten times sparser than the controller looks, but the
    // window barely moves in 10 ms; at 300 rollouts this takes seconds.
    let judge = judge();
    let rollouts = 300u64;
    let mut reverts = Vec::new();
    for i in 0..rollouts {
        let rps = [50, 200, 1000][i as usize % 3];
        let sim = simulate_errors(&judge, 0x5e71 + i, rps, (0.01, 0.01), 1);
        if let Some(r) = sim {
            reverts.push((i, rps, r));
        }
    }
    assert!(
        reverts.len() as u64 * 100 <= rollouts,
        "{} false reverts in {rollouts} rollouts: {reverts:?}",
        reverts.len()
    );
}

#[test]
fn failing_canary_is_caught_by_the_same_simulation() {
    // The simulation is not blind: a canary at 4% errors against stable at
    // 1% is reverted in nearly every rollout.
    let judge = judge();
    let caught = (0..30u64)
        .filter(|&i| simulate_errors(&judge, 0xbad + i, 200, (0.01, 0.04), 10).is_some())
        .count();
    assert!(caught >= 28, "caught {caught} of 30");
}

#[test]
fn identical_latencies_are_not_reverted() {
    // The latency checks over real windows: exponential latencies (mean
    // 20 ms over a 5 ms floor), identical for both upstreams, judged every
    // second through a 4-step rollout at 200 req/s.
    let judge = judge();
    let mut reverts = 0;
    for seed in 0..8u64 {
        let mut rng = Rng(0x1a7e + seed);
        let base = Instant::now();
        let stats = Stats::new(1, Duration::from_secs(10), base);
        let worker = stats.worker(0);
        let mut share = 0.0;
        'rollout: for second in 0..240u64 {
            let weight = [0.05, 0.25, 0.5, 1.0][(second / 60) as usize];
            for i in 0..200u64 {
                let now = base + Duration::from_millis(second * 1000 + i * 5);
                share += weight;
                let target = if share >= 1.0 {
                    share -= 1.0;
                    Target::Canary
                } else {
                    Target::Stable
                };
                let latency = 5.0 - 20.0 * rng.unit().ln();
                worker.upstream(target).record(
                    now,
                    Duration::from_secs_f64(latency / 1000.0),
                    false,
                );
            }
            let now = base + Duration::from_secs(second + 1);
            let stable = stats.window_snapshot(Target::Stable, now);
            let canary = stats.window_snapshot(Target::Canary, now);
            if judge.evaluate(&stable, &canary, 0, 0).is_breach() {
                reverts += 1;
                break 'rollout;
            }
        }
    }
    assert_eq!(reverts, 0);
}

#[test]
fn shadow_mismatches_breach_with_evidence_only() {
    let j = judge();
    // 80 of 200 copies answered in another status class than stable.
    let v = j.evaluate_shadow(&window(200, 80, ms(1))).expect("breach");
    assert_eq!(
        reason(v),
        "canary status class differs from stable's in 40.0% > 5.0% of 200 compared requests \
         (window 10s)"
    );
    // Too few pairs, or a rate whose lower bound is not above 5%: no breach.
    assert_eq!(j.evaluate_shadow(&window(19, 19, ms(1))), None);
    assert_eq!(j.evaluate_shadow(&window(20, 2, ms(1))), None);
    assert_eq!(j.evaluate_shadow(&window(1000, 10, ms(1))), None);
}
