//! The judge-quality simulator: many simulated rollouts through the real
//! [`Judge`] and the real rolling windows ([`serin_proxy::Stats`]), to
//! measure how often a healthy canary is reverted by chance and how fast, and
//! after how many canary requests, a bad one is caught.
//!
//! Traffic model (seeded, reproducible): canary at 10% of the traffic, so
//! stable gets 9× the canary's rate; Poisson arrivals; stable errors at 1%;
//! latencies log-normal with a 50 ms median and σ = 0.5 (p95 ≈ 114 ms). A bad
//! canary adds percentage points of errors, or multiplies every latency (so
//! its p95) by a factor. The judge looks like the controller's loop does
//! (every `interval`, when a request completed since the last look, or after
//! 1 s idle), with the default policy, over a 240 s rollout (4 steps × 60 s).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serin_control::{Judge, JudgePolicy, Look};
use serin_proxy::split::FastRng;
use serin_proxy::{OutcomeCursor, Stats, Target};
use tokio::time::Instant;

/// One kind of canary to simulate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Condition {
    /// Label, e.g. `+5 pp errors`.
    pub name: String,
    /// Canary requests per second.
    pub canary_rps: f64,
    /// Errors added to stable's rate, in percentage points.
    pub extra_error_pp: f64,
    /// Factor on every canary latency (1.0 = same as stable).
    pub latency_factor: f64,
}

/// What the simulated rollouts of one condition gave.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SimResult {
    /// The condition.
    pub name: String,
    /// Canary requests per second.
    pub canary_rps: f64,
    /// Whether the canary was as good as stable (any revert is false).
    pub healthy: bool,
    /// Rollouts simulated.
    pub rollouts: u64,
    /// Rollouts in which the judge reverted the canary.
    pub reverted: u64,
    /// Median time from the start of the rollout to the revert, seconds.
    pub median_seconds: f64,
    /// Median canary requests served before the revert.
    pub median_canary_requests: f64,
    /// 90th percentile of canary requests served before the revert.
    pub p90_canary_requests: f64,
    /// The most common revert reason (first words).
    pub typical_reason: String,
    /// One full revert reason, as the judge wrote it.
    pub example_reason: String,
}

/// Simulation settings.
#[derive(Clone, Debug)]
pub struct SimSettings {
    /// Rollouts of the healthy canary per rate.
    pub healthy_rollouts: u64,
    /// Rollouts of each bad canary per rate.
    pub bad_rollouts: u64,
    /// Length of a rollout.
    pub rollout: Duration,
    /// How often the judge looks.
    pub interval: Duration,
    /// Stable's error rate.
    pub base_error_rate: f64,
}

impl SimSettings {
    /// The settings of the full report (`quick`: fewer rollouts).
    pub fn new(quick: bool) -> Self {
        Self {
            healthy_rollouts: if quick { 100 } else { 1_000 },
            bad_rollouts: if quick { 30 } else { 200 },
            rollout: Duration::from_secs(240),
            interval: Duration::from_millis(100),
            base_error_rate: 0.01,
        }
    }
}

/// The conditions of issue #4 at one canary rate.
pub fn conditions(canary_rps: f64) -> Vec<Condition> {
    let mut out = vec![Condition {
        name: "healthy (identical to stable)".into(),
        canary_rps,
        extra_error_pp: 0.0,
        latency_factor: 1.0,
    }];
    for pp in [1.0, 2.0, 5.0, 20.0] {
        out.push(Condition {
            name: format!("+{pp:.0} pp errors"),
            canary_rps,
            extra_error_pp: pp,
            latency_factor: 1.0,
        });
    }
    for pct in [20.0, 50.0, 200.0] {
        out.push(Condition {
            name: format!("+{pct:.0}% p95"),
            canary_rps,
            extra_error_pp: 0.0,
            latency_factor: 1.0 + pct / 100.0,
        });
    }
    out
}

fn uniform(rng: &FastRng) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

fn exponential(rng: &FastRng, rate: f64) -> f64 {
    -uniform(rng).ln() / rate
}

fn normal(rng: &FastRng) -> f64 {
    let (u1, u2) = (uniform(rng), uniform(rng));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn latency(rng: &FastRng, factor: f64) -> Duration {
    let ms = 50.0 * (0.5 * normal(rng)).exp() * factor;
    Duration::from_secs_f64(ms / 1_000.0)
}

/// Outcome of one rollout: `Some((seconds, canary requests, reason))` if reverted.
fn rollout(
    judge: &Judge,
    cond: &Condition,
    settings: &SimSettings,
    seed: u64,
) -> Option<(f64, u64, String)> {
    let rng = FastRng::new(seed);
    let base = Instant::now();
    let stats = Stats::new(1, judge.policy().window, base);
    let worker = stats.worker(0);
    let rates = [cond.canary_rps * 9.0, cond.canary_rps];
    let errors = [
        settings.base_error_rate,
        (settings.base_error_rate + cond.extra_error_pp / 100.0).min(1.0),
    ];
    let factors = [1.0, cond.latency_factor];
    let mut next = [exponential(&rng, rates[0]), exponential(&rng, rates[1])];
    let mut counts = [0u64; 2];
    let mut last_look: Option<([u64; 2], f64)> = None;
    let mut evidence = judge.arm();
    let mut cursors: [OutcomeCursor; 2] = Default::default();
    let end = settings.rollout.as_secs_f64();
    let step = settings.interval.as_secs_f64();
    let mut t = step;
    while t <= end {
        // Every request that completed up to `t`, in time order.
        loop {
            let which = if next[0] <= next[1] { 0 } else { 1 };
            if next[which] > t {
                break;
            }
            let at = base + Duration::from_secs_f64(next[which]);
            let target = if which == 0 {
                Target::Stable
            } else {
                Target::Canary
            };
            worker.upstream(target).record(
                at,
                latency(&rng, factors[which]),
                uniform(&rng) < errors[which],
            );
            counts[which] += 1;
            next[which] += exponential(&rng, rates[which]);
        }
        let look = match last_look {
            Some((seen, at)) => seen != counts || t - at >= 1.0,
            None => true,
        };
        if look {
            let elapsed = t - last_look.map_or(0.0, |(_, at)| at);
            last_look = Some((counts, t));
            let now = base + Duration::from_secs_f64(t);
            let [stable_cursor, canary_cursor] = &mut cursors;
            let verdict = judge.evaluate(
                &mut evidence,
                &Look {
                    stable: &stats.new_outcomes(Target::Stable, stable_cursor, now),
                    canary: &stats.new_outcomes(Target::Canary, canary_cursor, now),
                    stable_window: &stats.window_snapshot(Target::Stable, now),
                    canary_window: &stats.window_snapshot(Target::Canary, now),
                    elapsed: Duration::from_secs_f64(elapsed),
                    stable_consecutive: stats.consecutive_errors(Target::Stable),
                    canary_consecutive: stats.consecutive_errors(Target::Canary),
                },
            );
            if verdict.is_breach() {
                return Some((t, counts[1], verdict.to_string()));
            }
        }
        t += step;
    }
    None
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Simulates every condition at 10 and 100 canary req/s.
pub fn run(settings: &SimSettings) -> Vec<SimResult> {
    let judge = Judge::new(JudgePolicy::default()).expect("the default policy is valid");
    let mut out = Vec::new();
    for rps in [10.0, 100.0] {
        for (ci, cond) in conditions(rps).into_iter().enumerate() {
            let healthy = cond.extra_error_pp == 0.0 && cond.latency_factor == 1.0;
            let n = if healthy {
                settings.healthy_rollouts
            } else {
                settings.bad_rollouts
            };
            let mut seconds = Vec::new();
            let mut requests = Vec::new();
            let mut reasons: Vec<String> = Vec::new();
            let mut example = None;
            for i in 0..n {
                let seed = (rps as u64) << 40 | (ci as u64) << 32 | i;
                if let Some((s, r, reason)) = rollout(&judge, &cond, settings, seed) {
                    seconds.push(s);
                    requests.push(r as f64);
                    reasons.push(reason.split(" over ").next().unwrap_or("").to_string());
                    example.get_or_insert(reason);
                }
            }
            seconds.sort_by(f64::total_cmp);
            requests.sort_by(f64::total_cmp);
            let typical_reason = most_common(&reasons);
            let r = SimResult {
                name: cond.name.clone(),
                canary_rps: rps,
                healthy,
                rollouts: n,
                reverted: seconds.len() as u64,
                median_seconds: percentile(&seconds, 0.5),
                median_canary_requests: percentile(&requests, 0.5),
                p90_canary_requests: percentile(&requests, 0.9),
                typical_reason,
                example_reason: example.unwrap_or_default(),
            };
            eprintln!(
                "judge sim {:>5.0} canary req/s, {:30}: {}/{} reverted, median {:.1} s, {:.0} canary requests",
                rps, r.name, r.reverted, r.rollouts, r.median_seconds, r.median_canary_requests
            );
            out.push(r);
        }
    }
    out
}

fn most_common(reasons: &[String]) -> String {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for r in reasons {
        // Group by the words before the first number.
        let key: String = r
            .split_whitespace()
            .take_while(|w| !w.starts_with(|c: char| c.is_ascii_digit()))
            .collect::<Vec<_>>()
            .join(" ");
        let key = if key.is_empty() { r.clone() } else { key };
        match kinds.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => kinds.push((key, 1)),
        }
    }
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    kinds.into_iter().next().map(|(k, _)| k).unwrap_or_default()
}
