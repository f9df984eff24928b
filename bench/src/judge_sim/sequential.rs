//! The sequential judge of issue #13, [`serin_control::Judge`], driven as
//! its controller drives it: one [`Evidence`] per arm; each look hands the
//! judge the outcomes completed since the previous look
//! ([`Stats::new_outcomes`]), both rolling windows, the time since the
//! previous look and the runs of errors in a row; at every re-arm (each
//! step start) fresh evidence (the windows go on: they always cover the
//! same time on both sides).
//!
//! One difference, which changes nothing the report counts: at a re-arm the
//! cursors are moved up to the re-arm and the time since the previous look
//! restarts there. The controller re-arms right after a look (its own step),
//! so there they are already there; here it lets a judge that skipped the
//! looks of an earlier step start at the re-arm as if it had made them.

use serin_control::{Evidence, Judge, JudgePolicy, Look};
use serin_proxy::{OutcomeCursor, Target};

use super::traffic::Request;
use super::{Memory, Moment, Recorded, SimJudge};

/// serin's judge with the default policy, over its own [`Stats`].
pub struct Sequential {
    judge: Judge,
    served: Recorded,
    evidence: Evidence,
    /// Where each upstream's new outcomes are read up to, stable first.
    cursors: [OutcomeCursor; 2],
    last_look: Moment,
}

impl Sequential {
    /// The judge with the default policy, armed at `start`.
    pub fn new(start: Moment) -> Self {
        let judge = Judge::new(JudgePolicy::default()).expect("the default policy is valid");
        Self {
            evidence: judge.arm(),
            served: Recorded::new(judge.policy().window, start),
            judge,
            cursors: Default::default(),
            last_look: start,
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
        self.served.record(r);
    }

    fn rearm(&mut self, at: Moment) {
        self.evidence = self.judge.arm();
        for (target, cursor) in Target::ALL.into_iter().zip(&mut self.cursors) {
            self.served.stats.new_outcomes(target, cursor, at.instant);
        }
        self.last_look = at;
        self.served.rearm();
    }

    fn look(&mut self, at: Moment) -> Option<String> {
        let [stable_cursor, canary_cursor] = &mut self.cursors;
        let stats = &self.served.stats;
        let stable = stats.new_outcomes(Target::Stable, stable_cursor, at.instant);
        let canary = stats.new_outcomes(Target::Canary, canary_cursor, at.instant);
        let look = Look {
            stable: &stable,
            canary: &canary,
            stable_window: &stats.window_snapshot(Target::Stable, at.instant),
            canary_window: &stats.window_snapshot(Target::Canary, at.instant),
            elapsed: at.instant - std::mem::replace(&mut self.last_look, at).instant,
            stable_consecutive: stats.consecutive_errors(Target::Stable),
            canary_consecutive: self.served.canary_run(),
        };
        let verdict = self.judge.evaluate(&mut self.evidence, &look);
        verdict.is_breach().then(|| verdict.to_string())
    }
}
