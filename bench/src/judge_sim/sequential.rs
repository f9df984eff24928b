//! The sequential judge of issue #13, [`serin_control::Judge`], driven as
//! its controller drives it: one [`Evidence`] per arm; each look hands the
//! judge the outcomes completed since the previous look
//! ([`Stats::new_outcomes`]), both rolling windows, the time since the
//! previous look and the runs of errors in a row; at every re-arm (each
//! step start) fresh evidence, and both windows restart together.
//!
//! One difference, which changes nothing the report counts: at a re-arm the
//! cursors are moved up to the re-arm and the time since the previous look
//! restarts there. The controller re-arms right after a look (its own step),
//! so there they are already there; here it lets a judge that skipped the
//! looks of an earlier step start at the re-arm as if it had made them.

use serin_control::{Evidence, Judge, JudgePolicy, Look};
use serin_proxy::{OutcomeCursor, Stats, Target};

use super::traffic::Request;
use super::{Memory, Moment, SimJudge};

/// serin's judge with the default policy, over its own [`Stats`].
pub struct Sequential {
    judge: Judge,
    stats: Stats,
    evidence: Evidence,
    /// Where each upstream's new outcomes are read up to, stable first.
    cursors: [OutcomeCursor; 2],
    last_look: Moment,
    /// Canary requests recorded so far, and at the last arm: the canary's
    /// run of errors counts only requests since the arm.
    canary_total: u64,
    armed_at: u64,
}

impl Sequential {
    /// The judge with the default policy, armed at `start`.
    pub fn new(start: Moment) -> Self {
        let judge = Judge::new(JudgePolicy::default()).expect("the default policy is valid");
        let stats = Stats::new(1, judge.policy().window, start.instant);
        Self {
            evidence: judge.arm(),
            judge,
            stats,
            cursors: Default::default(),
            last_look: start,
            canary_total: 0,
            armed_at: 0,
        }
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
        if r.target == Target::Canary {
            self.canary_total += 1;
        }
    }

    fn rearm(&mut self, at: Moment) {
        self.evidence = self.judge.arm();
        for (target, cursor) in Target::ALL.into_iter().zip(&mut self.cursors) {
            self.stats.new_outcomes(target, cursor, at.instant);
            self.stats.restart_window(target, at.instant);
        }
        self.last_look = at;
        self.armed_at = self.canary_total;
    }

    fn look(&mut self, at: Moment) -> Option<String> {
        let [stable_cursor, canary_cursor] = &mut self.cursors;
        let stable = self
            .stats
            .new_outcomes(Target::Stable, stable_cursor, at.instant);
        let canary = self
            .stats
            .new_outcomes(Target::Canary, canary_cursor, at.instant);
        let since_arm = self.canary_total - self.armed_at;
        let canary_run = u64::from(self.stats.consecutive_errors(Target::Canary)).min(since_arm);
        let look = Look {
            stable: &stable,
            canary: &canary,
            stable_window: &self.stats.window_snapshot(Target::Stable, at.instant),
            canary_window: &self.stats.window_snapshot(Target::Canary, at.instant),
            elapsed: at.instant - std::mem::replace(&mut self.last_look, at).instant,
            stable_consecutive: self.stats.consecutive_errors(Target::Stable),
            canary_consecutive: canary_run as u32,
        };
        let verdict = self.judge.evaluate(&mut self.evidence, &look);
        verdict.is_breach().then(|| verdict.to_string())
    }
}
