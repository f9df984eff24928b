//! The judge serin ships, [`serin_control::Judge`], driven as the controller
//! of issue #13 drives it: at every re-arm (each step start) both rolling
//! windows restart, so canary and stable are always compared over the same
//! time span.
//!
//! Until the sequential judge lands on main this drives whatever
//! `serin_control::Judge` main has (today's window judge, through its
//! windows); the report names the commit.

use serin_control::{Judge, JudgePolicy};
use serin_proxy::{Stats, Target};

use super::traffic::Request;
use super::{Memory, Moment, SimJudge};

/// serin's judge with the default policy, over its own [`Stats`].
pub struct Sequential {
    judge: Judge,
    stats: Stats,
}

impl Sequential {
    /// The judge with the default policy, its windows starting at `start`.
    pub fn new(start: Moment) -> Self {
        let judge = Judge::new(JudgePolicy::default()).expect("the default policy is valid");
        let stats = Stats::new(1, judge.policy().window, start.instant);
        Self { judge, stats }
    }
}

impl SimJudge for Sequential {
    fn name(&self) -> &'static str {
        "new"
    }

    fn memory(&self) -> Memory {
        Memory::SinceArm
    }

    fn record(&mut self, r: &Request) {
        self.stats
            .worker(0)
            .upstream(r.target)
            .record(r.at.instant, r.latency, r.error);
    }

    fn rearm(&mut self, at: Moment) {
        self.stats.restart_window(Target::Stable, at.instant);
        self.stats.restart_window(Target::Canary, at.instant);
    }

    fn look(&mut self, at: Moment) -> Option<String> {
        let verdict = self.judge.evaluate(
            &self.stats.window_snapshot(Target::Stable, at.instant),
            &self.stats.window_snapshot(Target::Canary, at.instant),
            self.stats.consecutive_errors(Target::Stable),
            self.stats.consecutive_errors(Target::Canary),
        );
        verdict.is_breach().then(|| verdict.to_string())
    }
}
