//! Every default of serin's settings, in one place.
//!
//! Why: a default written in several places drifts. The config loader
//! ([`crate::config::Config::from_raw`]), the types' `Default`s
//! ([`crate::JudgePolicy`], [`crate::config::RolloutSettings`],
//! [`crate::ControllerConfig`]), the CLI's `--help` ([`crate::cli`])
//! and the README's example config all show the same values, so each is
//! written once: the data plane's in [`serin_proxy::defaults`] (re-exported
//! here), the control plane's below. Tests check the rendered help against
//! these constants, and that the README's example config parses to exactly
//! the defaults (`control/tests/readme_config.rs`).
//!
//! Each constant's documentation names its config key. Limits that are not
//! defaults (the accepted range of `workers`, say) stay with their checks.

use std::time::Duration;

pub use serin_proxy::defaults::*;
pub use serin_proxy::split::{OVERRIDE_COOKIE, OVERRIDE_HEADER};

// === top level ===

/// `admin`: where the control API listens (loopback, so no token is needed).
pub const ADMIN: &str = "127.0.0.1:9901";
/// `state_dir`: where the rollout state is persisted.
pub const STATE_DIR: &str = "./serin-state";
/// `log`: the log filter, in `tracing` syntax (`RUST_LOG` overrides it).
pub const LOG: &str = "info";
/// `log_format`: `auto` writes text on a terminal and JSON lines otherwise
/// (a file, a pipe, a log collector).
pub const LOG_FORMAT: &str = "auto";
/// `canary_weight`: the canary's share in percent when no state is saved.
pub const CANARY_WEIGHT: f64 = 0.0;

// === [judge] ===

// `judge.window` is the data plane's stats window, [`WINDOW`], so the
// judge and the stats agree.
/// `judge.interval`: how often the judge looks at the windows.
pub const JUDGE_INTERVAL: Duration = Duration::from_millis(10);
/// `judge.min_requests`: canary requests needed since the step began before
/// the canary can be called healthy (a breach needs none).
pub const MIN_REQUESTS: u64 = 20;
/// `judge.max_error_rate`: the highest acceptable canary error rate (5%).
pub const MAX_ERROR_RATE: f64 = 0.05;
/// `judge.max_p95`: the highest acceptable canary p95 latency.
pub const MAX_P95: Duration = Duration::from_millis(1000);
/// `judge.alpha`: the chance, per step, that a canary as good as stable is
/// reverted (0.2%). With `ALPHA_PER_HOUR`, a 30-minute rollout of 4 steps
/// spends at most 1%: the false-revert budget. The bound is Doob's, which
/// the judge's discrete evidence rarely reaches: the simulator
/// (bench/REPORT.md) measures the real rate.
pub const ALPHA: f64 = 0.002;
/// `judge.alpha_per_hour`: the same chance per hour a step lasts (0.4%),
/// spent continuously so that a canary turning bad late is caught too.
pub const ALPHA_PER_HOUR: f64 = 0.004;
/// `judge.min_latency_shift`: the latency test reverts a canary whose
/// latencies, less 1 ms, are more than this many times stable's (over the
/// same time): 10% slower. Below it, a real but small slowdown is not worth
/// a revert.
pub const MIN_LATENCY_SHIFT: f64 = 1.1;
/// `judge.min_error_rate_difference`: how far (absolute) the canary's error
/// rate must exceed stable's before the relative check can breach: one
/// percentage point, since at high traffic the test finds even a 0.1-point
/// difference, which is not worth a revert.
pub const MIN_ERROR_RATE_DIFFERENCE: f64 = 0.01;
/// `judge.max_consecutive_errors`: canary errors in a row that revert at
/// once. Even at a 15% base error rate ten in a row happens by chance with
/// probability below 1e-8.
pub const MAX_CONSECUTIVE_ERRORS: u32 = 10;

/// `judge.max_shadow_mismatch_rate`: in phase `shadowing`, the highest
/// acceptable share of copied requests whose status class differs from
/// stable's answer to the same request (5%).
pub const MAX_SHADOW_MISMATCH_RATE: f64 = 0.05;

// === [rollout] ===

/// `rollout.steps`: the canary weights of a rollout, in percent.
pub const ROLLOUT_STEPS: [f64; 4] = [5.0, 25.0, 50.0, 100.0];
/// `rollout.hold`: the minimum time on each step.
pub const ROLLOUT_HOLD: Duration = Duration::from_secs(60);
/// `rollout.min_requests_per_step`: canary requests each step must serve
/// before it may advance.
pub const MIN_REQUESTS_PER_STEP: u64 = 50;

// === [shadow] ===

/// `shadow.percent`: the share of stable's eligible requests copied to the
/// canary in phase `shadowing`, when `POST /shadow` or a rollout names none.
pub const SHADOW_PERCENT: f64 = 100.0;

/// A duration as the config file and the flags write it: whole seconds as
/// `"60s"`, anything else in milliseconds (`"10ms"`, `"1500ms"`).
pub fn duration_text(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Rollout steps as the flags and the API write them: `"5,25,50,100"`.
pub fn steps_text(steps: &[f64]) -> String {
    steps
        .iter()
        .map(f64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// How often a fleet member reports its windows to the fleet's object.
pub const FLEET_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// The fleet Lease's duration (client-go's default).
pub const FLEET_LEASE_DURATION: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::parse_hold;

    #[test]
    fn duration_text_is_what_the_config_accepts() {
        for d in [
            JUDGE_INTERVAL,
            MAX_P95,
            ROLLOUT_HOLD,
            CONNECT_TIMEOUT,
            Duration::from_millis(1500),
        ] {
            assert_eq!(parse_hold(&duration_text(d)).unwrap(), d);
        }
        assert_eq!(duration_text(MAX_P95), "1s");
        assert_eq!(duration_text(JUDGE_INTERVAL), "10ms");
        assert_eq!(steps_text(&ROLLOUT_STEPS), "5,25,50,100");
    }
}
