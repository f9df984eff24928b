//! A Kayenta-style canary analysis, for comparison: Spinnaker's automated
//! canary analysis with the NetflixACAJudge, run at fixed 1 min intervals.
//!
//! At the end of each minute, the canary's requests of that minute are
//! compared with stable's (the baseline) of the same minute, one
//! Mann-Whitney U test per metric:
//! - latency: every request's latency;
//! - errors: every request's error indicator (0 or 1). Per-request values
//!   rather than per-second error rates: the test sees every request, which
//!   is the most the data allows (a per-second rate at 10 req/s is a coarse,
//!   tie-heavy number), so this is Kayenta at its best.
//!
//! Like the NetflixACAJudge, a metric fails only when the canary is
//! significantly *higher* (two-sided confidence 0.98, so a one-sided p below
//! 0.01 in the bad direction). The minute's score is the share of metrics
//! passing, in percent; a score below 75 (the marginal threshold) rolls the
//! canary back. With two metrics, one failing metric is a score of 50.

use serin_proxy::Target;

use super::normal;
use super::traffic::Request;
use super::{Memory, Moment, SimJudge};

/// Seconds between analyses.
const INTERVAL: f64 = 60.0;

/// A metric fails when the one-sided p-value of "canary higher" is below this.
const ALPHA: f64 = 0.01;

/// A score below this rolls back.
const MARGINAL_SCORE: f64 = 75.0;

/// One upstream's requests in the current minute.
#[derive(Debug, Default)]
struct Minute {
    /// Latencies, µs.
    latencies: Vec<u32>,
    errors: u64,
}

impl Minute {
    fn clear(&mut self) {
        self.latencies.clear();
        self.errors = 0;
    }

    fn requests(&self) -> u64 {
        self.latencies.len() as u64
    }
}

/// The interval analysis, fed every request of both upstreams.
#[derive(Debug)]
pub struct Kayenta {
    interval_end: f64,
    stable: Minute,
    canary: Minute,
    rollback: Option<String>,
}

impl Default for Kayenta {
    fn default() -> Self {
        Self {
            interval_end: INTERVAL,
            stable: Minute::default(),
            canary: Minute::default(),
            rollback: None,
        }
    }
}

impl Kayenta {
    /// Analyses every interval that ended by `secs`.
    fn analyse_until(&mut self, secs: f64) {
        while secs >= self.interval_end && self.rollback.is_none() {
            self.rollback = self.analyse();
            self.stable.clear();
            self.canary.clear();
            self.interval_end += INTERVAL;
        }
    }

    /// The current minute's analysis: the rollback's reason, if it fails.
    fn analyse(&mut self) -> Option<String> {
        let (stable, canary) = (&mut self.stable, &mut self.canary);
        if stable.requests() == 0 || canary.requests() == 0 {
            return None;
        }
        stable.latencies.sort_unstable();
        canary.latencies.sort_unstable();
        let latency = mann_whitney(merged(&canary.latencies, &stable.latencies));
        let errors = mann_whitney([
            (
                canary.requests() - canary.errors,
                stable.requests() - stable.errors,
            ),
            (canary.errors, stable.errors),
        ]);
        let failed: Vec<String> = [("latency", latency), ("errors", errors)]
            .into_iter()
            .filter(|(_, p)| *p < ALPHA)
            .map(|(metric, p)| {
                // Below f64's range the normal tail is 0: say so, not "0e0".
                let p = if p > 0.0 {
                    format!("p={p:.1e}")
                } else {
                    "p<1e-300".into()
                };
                format!("canary {metric} higher (Mann-Whitney {p})")
            })
            .collect();
        let score = 100.0 * (2 - failed.len()) as f64 / 2.0;
        (score < MARGINAL_SCORE).then(|| {
            format!(
                "score {score:.0} < 75 over 1 min ({} canary, {} stable requests): {}",
                canary.requests(),
                stable.requests(),
                failed.join(", ")
            )
        })
    }
}

impl SimJudge for Kayenta {
    fn name(&self) -> &'static str {
        "kayenta"
    }

    fn memory(&self) -> Memory {
        Memory::WholeRollout
    }

    fn record(&mut self, r: &Request) {
        self.analyse_until(r.at.secs);
        let minute = match r.target {
            Target::Stable => &mut self.stable,
            Target::Canary => &mut self.canary,
        };
        minute
            .latencies
            .push(r.latency.as_micros().min(u128::from(u32::MAX)) as u32);
        minute.errors += u64::from(r.error);
    }

    fn rearm(&mut self, _at: Moment) {}

    fn look(&mut self, at: Moment) -> Option<String> {
        self.analyse_until(at.secs);
        self.rollback.clone()
    }
}

// === Mann-Whitney ===

/// The distinct values of two sorted samples, ascending, as `(count in
/// canary, count in stable)`.
fn merged<'a>(canary: &'a [u32], stable: &'a [u32]) -> impl Iterator<Item = (u64, u64)> + 'a {
    let (mut i, mut j) = (0, 0);
    std::iter::from_fn(move || {
        let v = match (canary.get(i), stable.get(j)) {
            (Some(a), Some(b)) => *a.min(b),
            (Some(a), None) => *a,
            (None, Some(b)) => *b,
            (None, None) => return None,
        };
        let (i0, j0) = (i, j);
        while canary.get(i) == Some(&v) {
            i += 1;
        }
        while stable.get(j) == Some(&v) {
            j += 1;
        }
        Some(((i - i0) as u64, (j - j0) as u64))
    })
}

/// The one-sided p-value of "the canary's values are higher than stable's"
/// by the Mann-Whitney U test: `groups` are the distinct values, ascending,
/// as `(count in canary, count in stable)`. The normal approximation with
/// the tie correction of the variance and a continuity correction (as
/// `scipy.stats.mannwhitneyu(method="asymptotic", alternative="greater")`);
/// 1 when every value is tied.
pub fn mann_whitney(groups: impl IntoIterator<Item = (u64, u64)>) -> f64 {
    let (mut u, mut below, mut ties) = (0.0, 0.0, 0.0);
    let (mut n_canary, mut n_stable) = (0.0, 0.0);
    for (c, s) in groups {
        let (c, s) = (c as f64, s as f64);
        // Each canary value beats every stable value below it, and ties half.
        u += c * (below + s / 2.0);
        below += s;
        let t = c + s;
        ties += t * t * t - t;
        n_canary += c;
        n_stable += s;
    }
    let n = n_canary + n_stable;
    if n < 2.0 {
        return 1.0;
    }
    let variance = n_canary * n_stable / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if variance <= 0.0 {
        return 1.0;
    }
    let z = (u - n_canary * n_stable / 2.0 - 0.5) / variance.sqrt();
    normal::upper_tail(z)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    fn p(canary: &[u32], stable: &[u32]) -> f64 {
        let (mut c, mut s) = (canary.to_vec(), stable.to_vec());
        c.sort_unstable();
        s.sort_unstable();
        mann_whitney(merged(&c, &s))
    }

    #[test]
    fn mann_whitney_on_known_examples() {
        // canary 3 4 5, stable 1 2 3: ranks 3.5 5 6 → U = 8.5; one tied
        // pair, so σ² = 9/12 · (7 − 6/30) = 5.1; z = (8.5 − 4.5 − 0.5)/√5.1.
        let z = 3.5 / 5.1f64.sqrt();
        assert!((p(&[3, 4, 5], &[1, 2, 3]) - normal::upper_tail(z)).abs() < 1e-12);
        assert!((p(&[3, 4, 5], &[1, 2, 3]) - 0.060_57).abs() < 1e-4);
        // Textbook: x = 19 22 16 29 24, y = 20 11 17 12 → U(x) = 17 of 20;
        // no ties: σ² = 20 · 10 / 12; z = (17 − 10 − 0.5)/σ = 1.5922,
        // p = 0.0557.
        assert!((p(&[19, 22, 16, 29, 24], &[20, 11, 17, 12]) - 0.055_67).abs() < 1e-4);
        // The other way round it is the other tail.
        assert!(p(&[1, 2, 3], &[3, 4, 5]) > 0.9);
        // Everything tied: no evidence.
        assert_eq!(p(&[7, 7], &[7, 7, 7]), 1.0);
        // Error indicators: 6% of 1,000 against 1% of 9,000 is far beyond
        // chance; the same rate is not.
        assert!(mann_whitney([(940, 8_910), (60, 90)]) < 1e-10);
        assert!(mann_whitney([(990, 8_910), (10, 90)]) > 0.4);
    }

    #[test]
    fn a_slower_minute_scores_50_and_rolls_back() {
        let base = Instant::now();
        let mut k = Kayenta::default();
        let feed = |k: &mut Kayenta, target, i: u32, ms: f64| {
            k.record(&Request {
                at: Moment::at(base, f64::from(i) / 100.0),
                target,
                latency: Duration::from_secs_f64(ms / 1000.0),
                error: false,
            });
        };
        // Minute one: identical latencies; minute two: canary 20% slower.
        for i in 0..12_000 {
            let ms = 40.0 + f64::from(i % 37);
            let factor = if i >= 6_000 { 1.2 } else { 1.0 };
            feed(&mut k, Target::Stable, i, ms);
            if i % 10 == 0 {
                feed(&mut k, Target::Canary, i, ms * factor);
            }
        }
        assert_eq!(k.look(Moment::at(base, 60.0)), None);
        let reason = k.look(Moment::at(base, 120.0)).unwrap();
        assert!(
            reason.starts_with(
                "score 50 < 75 over 1 min (600 canary, 6000 stable requests): canary latency higher"
            ),
            "{reason}"
        );
    }
}
