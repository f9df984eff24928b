//! The simulated traffic: one seeded stream of completed requests per
//! upstream, merged in time order, which every judge of a rollout sees.
//!
//! Each upstream has its own generator, and every request takes exactly
//! three draws from it (the gap to the next arrival, the error, the
//! latency), each by inverse transform. So the same seed gives the same
//! arrivals, and the same uniform draws behind every error and latency,
//! whatever the condition: a regression only moves the threshold of the
//! error draw and scales the latency after its onset. A bad rollout is
//! therefore identical to the healthy rollout of the same seed up to the
//! onset (the driver relies on it), and conditions differ by their effect,
//! not by their luck.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serin_proxy::split::FastRng;
use serin_proxy::Target;
use tokio::time::Instant;

use super::normal;
use super::Moment;

/// The median latency of both upstreams while healthy.
const MEDIAN: f64 = 0.050;

/// σ of the latency's logarithm.
const SIGMA: f64 = 0.5;

/// [`LatencyModel::HeavyTail`]: quantiles above this one follow the Pareto
/// tail.
const TAIL_FROM: f64 = 0.9;

/// [`LatencyModel::HeavyTail`]: the Pareto tail's index (below 2: infinite
/// variance).
const TAIL_INDEX: f64 = 1.5;

/// The shape of both upstreams' latency while healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LatencyModel {
    /// Log-normal: median 50 ms, σ = 0.5.
    LogNormal,
    /// The same log-normal up to its p90 (94.9 ms), then a Pareto tail of
    /// index 1.5 from there: `q(u) = q(0.9) · (0.1 / (1 − u))^(1/1.5)`.
    HeavyTail,
}

impl LatencyModel {
    /// Both models.
    pub const ALL: [LatencyModel; 2] = [LatencyModel::LogNormal, LatencyModel::HeavyTail];

    /// The latency, in seconds, at quantile `u` in (0, 1).
    pub fn quantile(self, u: f64) -> f64 {
        let log_normal = |u: f64| MEDIAN * (SIGMA * normal::quantile(u)).exp();
        match self {
            LatencyModel::HeavyTail if u > TAIL_FROM => {
                log_normal(TAIL_FROM) * ((1.0 - TAIL_FROM) / (1.0 - u)).powf(1.0 / TAIL_INDEX)
            }
            _ => log_normal(u),
        }
    }

    /// Its name in the report.
    pub fn label(self) -> &'static str {
        match self {
            LatencyModel::LogNormal => "log-normal",
            LatencyModel::HeavyTail => "heavy tail",
        }
    }
}

/// What changes, from one instant on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Change {
    /// Seconds from the start of the rollout (`f64::INFINITY`: never).
    pub at: f64,
    /// Errors added to the rate, as a ratio (0.05 = +5 pp).
    pub extra_error: f64,
    /// Factor on every latency.
    pub latency_factor: f64,
    /// Whether stable changes too (a shared dependency), or the canary alone.
    pub shared: bool,
}

impl Change {
    /// No change at all.
    pub const NONE: Change = Change {
        at: f64::INFINITY,
        extra_error: 0.0,
        latency_factor: 1.0,
        shared: false,
    };
}

/// One rollout's traffic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spec {
    /// Canary requests per second; stable gets 9 times as many.
    pub canary_rps: f64,
    /// Both upstreams' error rate while healthy, as a ratio.
    pub error_rate: f64,
    /// Both upstreams' latency while healthy.
    pub latency: LatencyModel,
    /// The change.
    pub change: Change,
}

/// One completed request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    /// When it completed.
    pub at: Moment,
    /// Which upstream served it.
    pub target: Target,
    /// Its latency.
    pub latency: Duration,
    /// Whether it was an error.
    pub error: bool,
}

// === impl Stream ===

/// One upstream's requests.
struct Stream {
    target: Target,
    rng: FastRng,
    rate: f64,
    latency: LatencyModel,
    /// Completion time of the next request, seconds.
    next: f64,
    onset: f64,
    /// Error rate before and after the onset.
    error: [f64; 2],
    /// Latency factor before and after the onset.
    factor: [f64; 2],
}

impl Stream {
    fn new(spec: &Spec, target: Target, seed: u64) -> Self {
        let changes = target == Target::Canary || spec.change.shared;
        let c = if changes { spec.change } else { Change::NONE };
        let rate = match target {
            Target::Stable => 9.0 * spec.canary_rps,
            Target::Canary => spec.canary_rps,
        };
        let rng = FastRng::new(seed);
        let next = -uniform(&rng).ln() / rate;
        Self {
            target,
            rng,
            rate,
            latency: spec.latency,
            next,
            onset: c.at,
            error: [spec.error_rate, (spec.error_rate + c.extra_error).min(1.0)],
            factor: [1.0, c.latency_factor],
        }
    }

    /// The request completing at `self.next`, and the next one drawn.
    fn take(&mut self, base: Instant) -> Request {
        let at = self.next;
        self.next += -uniform(&self.rng).ln() / self.rate;
        let after = usize::from(at >= self.onset);
        let error = uniform(&self.rng) < self.error[after];
        let latency = self.latency.quantile(uniform(&self.rng)) * self.factor[after];
        Request {
            at: Moment::at(base, at),
            target: self.target,
            latency: Duration::from_secs_f64(latency),
            error,
        }
    }
}

/// A uniform draw in (0, 1).
fn uniform(rng: &FastRng) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

// === impl Traffic ===

/// Both upstreams' requests of one rollout, in completion order.
pub struct Traffic {
    base: Instant,
    streams: [Stream; 2],
}

impl Traffic {
    /// The traffic of `spec` for rollout `seed`, its clock starting at `base`.
    pub fn new(spec: &Spec, seed: u64, base: Instant) -> Self {
        Self {
            base,
            streams: [
                Stream::new(spec, Target::Stable, mix(seed, 1)),
                Stream::new(spec, Target::Canary, mix(seed, 2)),
            ],
        }
    }

    /// The next request completing at or before `until` (seconds), if any.
    pub fn next_until(&mut self, until: f64) -> Option<Request> {
        let [stable, canary] = &mut self.streams;
        let first = if stable.next <= canary.next {
            stable
        } else {
            canary
        };
        (first.next <= until).then(|| first.take(self.base))
    }
}

/// A seed for one of a rollout's generators (splitmix64's finaliser).
pub fn mix(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(change: Change) -> Spec {
        Spec {
            canary_rps: 10.0,
            error_rate: 0.01,
            latency: LatencyModel::LogNormal,
            change,
        }
    }

    fn requests(spec: &Spec, seed: u64, base: Instant, until: f64) -> Vec<Request> {
        let mut t = Traffic::new(spec, seed, base);
        std::iter::from_fn(|| t.next_until(until)).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_requests() {
        let base = Instant::now();
        let healthy = spec(Change::NONE);
        let a = requests(&healthy, 7, base, 60.0);
        assert_eq!(a, requests(&healthy, 7, base, 60.0));
        assert_ne!(a, requests(&healthy, 8, base, 60.0));
        // Time order, both upstreams, about 10 and 90 req/s.
        assert!(a.windows(2).all(|w| w[0].at.secs <= w[1].at.secs));
        let canary = a.iter().filter(|r| r.target == Target::Canary).count();
        assert!((450..750).contains(&canary), "{canary}");
        assert!((4_800..6_000).contains(&(a.len() - canary)), "{}", a.len());
    }

    #[test]
    fn a_regression_changes_only_the_canary_after_its_onset() {
        let base = Instant::now();
        let healthy = requests(&spec(Change::NONE), 3, base, 120.0);
        let change = Change {
            at: 60.0,
            extra_error: 0.2,
            latency_factor: 2.0,
            shared: false,
        };
        let bad = requests(&spec(change), 3, base, 120.0);
        assert_eq!(healthy.len(), bad.len());
        let mut more_errors = 0;
        for (h, b) in healthy.iter().zip(&bad) {
            assert_eq!((h.at, h.target), (b.at, b.target));
            if h.target == Target::Stable || h.at.secs < 60.0 {
                assert_eq!(h, b);
            } else {
                assert!(twice(h, b));
                assert!(b.error >= h.error);
                more_errors += usize::from(b.error && !h.error);
            }
        }
        assert!(more_errors > 60, "{more_errors}");
        // A shared change moves stable too.
        let shared = requests(
            &spec(Change {
                shared: true,
                ..change
            }),
            3,
            base,
            120.0,
        );
        let late = |r: &&Request| r.target == Target::Stable && r.at.secs >= 60.0;
        let (h, s) = (
            healthy.iter().find(late).unwrap(),
            shared.iter().find(late).unwrap(),
        );
        assert!(twice(h, s));
    }

    /// `b`'s latency is twice `a`'s (to the nanosecond `Duration` keeps).
    fn twice(a: &Request, b: &Request) -> bool {
        (b.latency.as_secs_f64() - 2.0 * a.latency.as_secs_f64()).abs() < 2e-9
    }

    #[test]
    fn the_latency_models_have_their_documented_quantiles() {
        let ms = |m: LatencyModel, q: f64| m.quantile(q) * 1000.0;
        let close = |a: f64, b: f64| (a - b).abs() < 0.1;
        assert!(close(ms(LatencyModel::LogNormal, 0.5), 50.0));
        assert!(close(ms(LatencyModel::LogNormal, 0.95), 113.8));
        assert!(close(ms(LatencyModel::LogNormal, 0.99), 160.0));
        assert!(close(ms(LatencyModel::HeavyTail, 0.5), 50.0));
        assert!(close(ms(LatencyModel::HeavyTail, 0.9), 94.9));
        assert!(close(ms(LatencyModel::HeavyTail, 0.95), 150.6));
        assert!(close(ms(LatencyModel::HeavyTail, 0.99), 440.5));
    }
}
