//! A Flagger-style analysis, for comparison: what a canary gets from the
//! most common Kubernetes canary controller with its documented defaults.
//!
//! Every `interval` (1 min), the canary's requests of that minute are
//! checked against fixed limits: request-success-rate ≥ 99% and
//! request-duration p99 ≤ 500 ms. A failing check adds one to the failed
//! checks, which passing checks never reset; at `threshold` (5) failed
//! checks the canary is rolled back. Stable is never looked at. The p99 is
//! the exact order statistic of the minute's latencies (Flagger reads
//! Prometheus' `histogram_quantile`, which interpolates in buckets); a
//! minute without canary requests passes.

use serin_proxy::Target;

use super::traffic::Request;
use super::{Memory, Moment, SimJudge};

/// Seconds between checks (`analysis.interval: 1m`).
const INTERVAL: f64 = 60.0;

/// Failed checks that roll back (`analysis.threshold: 5`).
const THRESHOLD: u32 = 5;

/// Lowest passing success rate (`request-success-rate` `thresholdRange.min: 99`).
const MIN_SUCCESS: f64 = 0.99;

/// Highest passing p99, µs (`request-duration` `thresholdRange.max: 500`).
const MAX_P99_MICROS: u32 = 500_000;

/// The interval check, fed every canary request.
#[derive(Debug)]
pub struct Flagger {
    /// End of the current interval, seconds from the rollout's start.
    interval_end: f64,
    requests: u64,
    errors: u64,
    /// The current interval's canary latencies, µs.
    latencies: Vec<u32>,
    failed_checks: u32,
    /// The rollback, once decided (given out at the next look).
    rollback: Option<String>,
}

impl Default for Flagger {
    fn default() -> Self {
        Self {
            interval_end: INTERVAL,
            requests: 0,
            errors: 0,
            latencies: Vec::new(),
            failed_checks: 0,
            rollback: None,
        }
    }
}

impl Flagger {
    /// Runs the checks of every interval that ended by `secs`.
    fn check_until(&mut self, secs: f64) {
        while secs >= self.interval_end && self.rollback.is_none() {
            let failure = self.check();
            self.requests = 0;
            self.errors = 0;
            self.latencies.clear();
            self.interval_end += INTERVAL;
            if let Some(failure) = failure {
                self.failed_checks += 1;
                if self.failed_checks >= THRESHOLD {
                    self.rollback = Some(format!(
                        "{} failed checks; the last: {failure}",
                        self.failed_checks
                    ));
                }
            }
        }
    }

    /// The current interval's check: what failed, if anything.
    fn check(&mut self) -> Option<String> {
        if self.requests == 0 {
            return None;
        }
        let success = 1.0 - self.errors as f64 / self.requests as f64;
        let rank = ((0.99 * self.latencies.len() as f64).ceil() as usize).max(1) - 1;
        let p99 = *self.latencies.select_nth_unstable(rank).1;
        let mut failed = Vec::new();
        if success < MIN_SUCCESS {
            failed.push(format!("success rate {:.2}% < 99%", success * 100.0));
        }
        if p99 > MAX_P99_MICROS {
            failed.push(format!("p99 {:.0}ms > 500ms", f64::from(p99) / 1000.0));
        }
        (!failed.is_empty()).then(|| {
            format!(
                "{} over {} canary requests in 1 min",
                failed.join(", "),
                self.requests
            )
        })
    }
}

impl SimJudge for Flagger {
    fn name(&self) -> &'static str {
        "flagger"
    }

    fn memory(&self) -> Memory {
        Memory::WholeRollout
    }

    fn record(&mut self, r: &Request) {
        if r.target != Target::Canary {
            return;
        }
        // A request of a later interval closes this one first.
        self.check_until(r.at.secs);
        self.requests += 1;
        self.errors += u64::from(r.error);
        self.latencies
            .push(r.latency.as_micros().min(u128::from(u32::MAX)) as u32);
    }

    fn rearm(&mut self, _at: Moment) {}

    fn look(&mut self, at: Moment) -> Option<String> {
        self.check_until(at.secs);
        self.rollback.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    /// One interval of `n` canary requests, `errors` of them failed, at `ms` each.
    fn minute(f: &mut Flagger, base: Instant, k: u32, n: u32, errors: u32, ms: u64) {
        for i in 0..n {
            let secs = f64::from(k) * 60.0 + 1.0 + f64::from(i) * 50.0 / f64::from(n);
            f.record(&Request {
                at: Moment::at(base, secs),
                target: Target::Canary,
                latency: Duration::from_millis(ms),
                error: i < errors,
            });
        }
    }

    #[test]
    fn five_failed_checks_roll_back_and_passing_ones_do_not_reset_the_count() {
        let base = Instant::now();
        let mut f = Flagger::default();
        let look = |f: &mut Flagger, k: u32| f.look(Moment::at(base, f64::from(k + 1) * 60.0));
        // Four failing minutes (2% errors, or a slow p99), each followed by
        // a passing one: no rollback yet.
        for k in 0..4 {
            if k % 2 == 0 {
                minute(&mut f, base, 2 * k, 100, 2, 20);
            } else {
                minute(&mut f, base, 2 * k, 100, 0, 600);
            }
            assert_eq!(look(&mut f, 2 * k), None);
            minute(&mut f, base, 2 * k + 1, 100, 1, 20);
            assert_eq!(look(&mut f, 2 * k + 1), None);
        }
        assert_eq!(f.failed_checks, 4);
        // The fifth failure rolls back, and the rollback stays.
        minute(&mut f, base, 8, 100, 3, 600);
        assert_eq!(
            look(&mut f, 8).as_deref(),
            Some(
                "5 failed checks; the last: success rate 97.00% < 99%, p99 600ms > 500ms \
                 over 100 canary requests in 1 min"
            )
        );
        assert!(look(&mut f, 9).is_some());
    }

    #[test]
    fn an_interval_is_closed_by_the_first_request_after_it() {
        let base = Instant::now();
        let mut f = Flagger::default();
        minute(&mut f, base, 0, 100, 5, 20);
        // No look at 60 s: the next minute's first request closes it.
        minute(&mut f, base, 1, 100, 0, 20);
        assert_eq!(f.failed_checks, 1);
        assert_eq!(f.requests, 100);
    }
}
