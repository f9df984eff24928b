//! The rollout state machine: phase, canary weight, steps, hold, the latch
//! and the history of transitions.
//!
//! It exists so that every rule about when traffic may move is in one place
//! and is tested with a paused clock, apart from sockets, files and timers.
//! It never touches routes, disk or the network itself: each operation says
//! what happened (an [`Event`] or an error) and the controller swaps the
//! route table, persists and notifies.
//!
//! Rules that matter for safety:
//! - A judge breach reverts the canary to 0 in every phase where it has
//!   weight, `promoted` included: until stable is redeployed it is still the
//!   fallback, so a promoted canary that breaks is reverted too.
//! - A revert is **latched** (phase `rolled_back`). Only an explicit
//!   [`Rollout::set_weight`], [`Rollout::start_rollout`] or
//!   [`Rollout::resume`] raises the weight again; nothing the judge says can.
//! - A step advances only after its hold has elapsed, the canary has served
//!   `min_requests_per_step` requests since the step began, and the judge
//!   has enough data to call it healthy. Too little traffic holds the step;
//!   it is never a failure.
//! - Phase `shadowing` sends no user to the canary: a share of stable's
//!   requests is copied to it and its answers are judged. A breach there
//!   rolls back (latched) like any other, so a rollout whose first step is
//!   a shadow stops before any user reaches the canary; a healthy shadow
//!   step advances to the first weight step under the rules above.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serin_proxy::split::MAX_BASIS_POINTS;
use tokio::time::Instant;

use crate::defaults;
use crate::judge::{Secs, Verdict};

/// Transitions kept in the history; older ones are dropped first.
pub const HISTORY_LIMIT: usize = 1000;
/// Most steps a rollout may have.
pub const MAX_STEPS: usize = 100;

// === impl Phase ===

/// Where the canary stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No canary traffic and no rollout: the starting point.
    Steady,
    /// The weight was set by hand; the judge still guards it.
    Manual,
    /// No user reaches the canary; copies of stable's requests do, and the
    /// judge reads their outcomes (by hand, or a rollout's first step).
    Shadowing,
    /// A progressive rollout is moving through its steps.
    Progressing,
    /// A rollout frozen at its current step; the judge still guards it.
    Paused,
    /// The canary takes all traffic.
    Promoted,
    /// The canary was reverted to 0 and is latched there.
    RolledBack,
}

impl Phase {
    /// Every phase, for per-phase gauges.
    pub const ALL: [Phase; 7] = [
        Phase::Steady,
        Phase::Manual,
        Phase::Shadowing,
        Phase::Progressing,
        Phase::Paused,
        Phase::Promoted,
        Phase::RolledBack,
    ];

    /// The snake_case name used in JSON, metrics and text.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Steady => "steady",
            Phase::Manual => "manual",
            Phase::Shadowing => "shadowing",
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Promoted => "promoted",
            Phase::RolledBack => "rolled_back",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who caused a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    /// The judge loop (a breach, a step, a promotion at the end of a rollout).
    Judge,
    /// A control API call (or the CLI through it).
    Api,
    /// Loading state at start-up.
    Startup,
    /// The fleet's shared rollout (`serin run --fleet`), applied from the
    /// Kubernetes API.
    Fleet,
}

impl Actor {
    /// Every actor, for per-actor counters.
    pub const ALL: [Actor; 4] = [Actor::Judge, Actor::Api, Actor::Startup, Actor::Fleet];

    /// The snake_case name used in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Actor::Judge => "judge",
            Actor::Api => "api",
            Actor::Startup => "startup",
            Actor::Fleet => "fleet",
        }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something worth a webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The canary was reverted to 0 (by the judge or the API).
    Rollback,
    /// The canary took all traffic.
    Promoted,
    /// A rollout moved to a step (including its first).
    Step,
    /// A rollout was paused.
    Paused,
    /// A step's hold is over but it cannot advance for lack of traffic.
    /// Sent once per step.
    JudgeBlocked,
    /// Shadowing began (by hand, or as a rollout's first step).
    Shadowing,
}

impl Event {
    /// The snake_case name used in webhook bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Rollback => "rollback",
            Event::Promoted => "promoted",
            Event::Step => "step",
            Event::Paused => "paused",
            Event::JudgeBlocked => "judge_blocked",
            Event::Shadowing => "shadowing",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the history (`GET /history`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// Wall-clock time, RFC 3339 UTC (e.g. `2026-11-23T04:40:00.123Z`).
    pub at: String,
    /// Canary weight before, in percent.
    pub from: f64,
    /// Canary weight after, in percent.
    pub to: f64,
    /// Phase after.
    pub phase: Phase,
    /// Why, in words.
    pub reason: String,
    /// Who.
    pub actor: Actor,
}

/// Where [`Rollout::resume`] takes a rolled-back canary: the phase and
/// weight it had when it was reverted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// `manual`, `progressing` (a paused rollout resumes running) or `promoted`.
    pub phase: Phase,
    /// The weight to restore, in basis points.
    pub canary_weight_bp: u16,
}

/// Why an operation was refused. The text is shown to users as is.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RolloutError {
    /// A weight outside 0..=100.
    #[error("canary weight must be a percentage from 0 to 100 (got {got}); write 12.5 for 12.5%")]
    InvalidWeight {
        /// The value given.
        got: f64,
    },
    /// No steps.
    #[error("rollout steps must not be empty; write e.g. [5, 25, 50, 100]")]
    EmptySteps,
    /// More than [`MAX_STEPS`] steps.
    #[error("a rollout has at most {MAX_STEPS} steps (got {got})")]
    TooManySteps {
        /// How many were given.
        got: usize,
    },
    /// A step outside (0, 100].
    #[error(
        "rollout step {got} is outside (0, 100]; steps are percentages, e.g. [5, 25, 50, 100]"
    )]
    StepOutOfRange {
        /// The value given.
        got: f64,
    },
    /// Steps that do not increase (after rounding to 0.01%).
    #[error("rollout steps must be strictly increasing (got {prev} then {next})")]
    StepsNotIncreasing {
        /// The earlier step.
        prev: f64,
        /// The step that is not above it.
        next: f64,
    },
    /// A last step other than 100.
    #[error(
        "the last rollout step must be 100 (got {last}); a rollout ends in promotion. \
         To keep the canary at {last}%, set the weight instead"
    )]
    LastStepNot100 {
        /// The last step given.
        last: f64,
    },
    /// Promote or pause while rolled back.
    #[error("the canary is rolled back; start a rollout, set a weight or resume first")]
    Latched,
    /// Pause without a running rollout.
    #[error("no rollout to pause: phase is {phase}")]
    NotProgressing {
        /// The current phase.
        phase: Phase,
    },
    /// Resume with nothing paused or rolled back.
    #[error("nothing to resume: phase is {phase}; start a rollout or set a weight")]
    NothingToResume {
        /// The current phase.
        phase: Phase,
    },
    /// A shadow share outside (0, 100].
    #[error("shadow percent must be above 0 and at most 100 (got {got}); write 100 to copy every eligible request, 12.5 for one in eight")]
    InvalidShadowPercent {
        /// The value given.
        got: f64,
    },
    /// A hold that is not a duration.
    #[error("hold must be a duration like 60s, 5m, 1m30s or 500ms (got {got:?})")]
    InvalidHold {
        /// The text given.
        got: String,
    },
    /// A saved state that cannot be right.
    #[error("saved rollout state is invalid: {0}")]
    InvalidState(String),
}

// === impl RolloutState ===

/// The persisted form of a [`Rollout`]: everything but the step clock,
/// which restarts when the state is loaded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The phase.
    pub phase: Phase,
    /// The canary weight, in basis points.
    pub canary_weight_bp: u16,
    /// Rollout steps, in percent.
    pub steps: Vec<f64>,
    /// Index of the current step in `steps`.
    pub step: usize,
    /// Hold at each step, in milliseconds.
    pub hold_ms: u64,
    /// True while the canary is reverted and latched at 0.
    pub latched: bool,
    /// The last reason (a breach, a hold, an operator's action).
    pub reason: String,
    /// Where `resume` takes a rolled-back canary, if anywhere.
    pub resume: Option<ResumePoint>,
    /// Recent transitions, oldest first, at most [`HISTORY_LIMIT`].
    pub history: VecDeque<Transition>,
    /// Share of stable's requests copied to the canary in phase
    /// `shadowing`, in basis points (0 in a state saved before shadowing existed).
    #[serde(default)]
    pub shadow_bp: u16,
    /// The hold of a rollout's shadow step, in milliseconds, while that
    /// step is current (or was, when it was rolled back); none for a shadow
    /// set by hand.
    #[serde(default)]
    pub shadow_hold_ms: Option<u64>,
}

/// What `/status` shows of a rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutSnapshot {
    /// The phase.
    pub phase: Phase,
    /// The canary weight, in percent.
    pub canary_weight: f64,
    /// The current step, counted from 1; 0 outside a rollout.
    pub step: usize,
    /// The rollout's steps, in percent.
    pub steps: Vec<f64>,
    /// The hold at each step, e.g. `60s`.
    pub hold: String,
    /// True while the canary is reverted and latched at 0.
    pub latched: bool,
    /// The last reason; empty if none.
    pub reason: String,
}

// === impl Rollout ===

/// The rollout state machine. See the module docs for its rules.
#[derive(Clone, Debug)]
pub struct Rollout {
    phase: Phase,
    weight_bp: u16,
    steps: Vec<f64>,
    step: usize,
    hold: Duration,
    latched: bool,
    reason: String,
    resume: Option<ResumePoint>,
    history: VecDeque<Transition>,
    /// Share copied to the canary in phase `shadowing`, in basis points.
    shadow_bp: u16,
    /// The hold of a rollout's shadow step, while it is current.
    shadow_hold: Option<Duration>,
    /// When the current step began (or the rollout resumed).
    step_started: Instant,
    /// Cumulative canary requests when the current step began.
    step_base_requests: u64,
    /// Whether `judge_blocked` was already sent for the current step.
    blocked_sent: bool,
}

impl Rollout {
    /// A steady rollout: canary at 0, default steps and hold, no history.
    pub fn new(now: Instant) -> Self {
        Self {
            phase: Phase::Steady,
            weight_bp: 0,
            steps: defaults::ROLLOUT_STEPS.to_vec(),
            step: 0,
            hold: defaults::ROLLOUT_HOLD,
            latched: false,
            reason: String::new(),
            resume: None,
            history: VecDeque::new(),
            shadow_bp: 0,
            shadow_hold: None,
            step_started: now,
            step_base_requests: 0,
            blocked_sent: false,
        }
    }

    /// Restores a saved state. A running rollout restarts its current step:
    /// the hold and the request count begin again at `now` and
    /// `canary_requests` (the cumulative canary count).
    pub fn from_state(
        state: RolloutState,
        now: Instant,
        canary_requests: u64,
    ) -> Result<Self, RolloutError> {
        let invalid = |what: String| Err(RolloutError::InvalidState(what));
        if state.canary_weight_bp > MAX_BASIS_POINTS {
            return invalid(format!(
                "canary weight {} bp is above {MAX_BASIS_POINTS}",
                state.canary_weight_bp
            ));
        }
        let steps =
            validate_steps(&state.steps).map_err(|e| RolloutError::InvalidState(e.to_string()))?;
        if state.step >= steps.len() {
            return invalid(format!(
                "step index {} is past the {} steps",
                state.step,
                steps.len()
            ));
        }
        if state.phase == Phase::Shadowing
            && (state.canary_weight_bp != 0
                || state.shadow_bp == 0
                || state.shadow_bp > MAX_BASIS_POINTS)
        {
            return invalid(format!(
                "phase shadowing with canary weight {} bp and shadow {} bp",
                state.canary_weight_bp, state.shadow_bp
            ));
        }
        if state.latched != (state.phase == Phase::RolledBack)
            || (state.phase == Phase::RolledBack && state.canary_weight_bp != 0)
        {
            return invalid(format!(
                "phase {} with latch {} and canary weight {} bp",
                state.phase, state.latched, state.canary_weight_bp
            ));
        }
        let mut history = state.history;
        while history.len() > HISTORY_LIMIT {
            history.pop_front();
        }
        Ok(Self {
            phase: state.phase,
            weight_bp: state.canary_weight_bp,
            steps,
            step: state.step,
            hold: Duration::from_millis(state.hold_ms),
            latched: state.latched,
            reason: state.reason,
            resume: state.resume,
            history,
            shadow_bp: state.shadow_bp.min(MAX_BASIS_POINTS),
            shadow_hold: state.shadow_hold_ms.map(Duration::from_millis),
            step_started: now,
            step_base_requests: canary_requests,
            blocked_sent: false,
        })
    }

    /// The persisted form.
    pub fn to_state(&self) -> RolloutState {
        RolloutState {
            phase: self.phase,
            canary_weight_bp: self.weight_bp,
            steps: self.steps.clone(),
            step: self.step,
            hold_ms: self.hold.as_millis().min(u128::from(u64::MAX)) as u64,
            latched: self.latched,
            reason: self.reason.clone(),
            resume: self.resume,
            history: self.history.clone(),
            shadow_bp: self.shadow_bp,
            shadow_hold_ms: self
                .shadow_hold
                .map(|h| h.as_millis().min(u128::from(u64::MAX)) as u64),
        }
    }

    /// What `/status` shows.
    pub fn snapshot(&self) -> RolloutSnapshot {
        let in_rollout = matches!(self.phase, Phase::Progressing | Phase::Paused)
            || self.resume.is_some_and(|r| r.phase == Phase::Progressing);
        RolloutSnapshot {
            phase: self.phase,
            canary_weight: percent(self.weight_bp),
            step: if in_rollout { self.step + 1 } else { 0 },
            steps: self.steps.clone(),
            hold: Secs(self.hold).to_string(),
            latched: self.latched,
            reason: self.reason.clone(),
        }
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The canary weight in basis points: what the route table must hold.
    pub fn canary_weight_bp(&self) -> u16 {
        self.weight_bp
    }

    /// True while the canary is reverted and latched at 0.
    pub fn latched(&self) -> bool {
        self.latched
    }

    /// The share of stable's requests copied to the canary, in basis
    /// points: what the route table must hold (0 outside `shadowing`).
    pub fn shadow_bp(&self) -> u16 {
        if self.phase == Phase::Shadowing {
            self.shadow_bp
        } else {
            0
        }
    }

    /// The hold of the rollout's shadow step, while it is current.
    pub fn shadow_hold(&self) -> Option<Duration> {
        self.shadow_hold.filter(|_| self.phase == Phase::Shadowing)
    }

    /// The last reason; empty if none.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Replaces the reason without a transition (a fleet's hold report).
    pub fn set_reason(&mut self, reason: String) {
        self.reason = reason;
    }

    /// Recent transitions, oldest first.
    pub fn history(&self) -> &VecDeque<Transition> {
        &self.history
    }

    /// Records a start-up transition from `from_bp` to the current weight
    /// (e.g. "loaded state", or "state file corrupt; canary at 0"). It
    /// becomes the current reason only if there is none, so a loaded
    /// rollback keeps saying why it happened.
    pub fn record_startup(&mut self, from_bp: u16, reason: String) {
        if self.reason.is_empty() {
            self.reason.clone_from(&reason);
        }
        self.record(from_bp, Actor::Startup, reason);
    }

    /// Sets the canary weight by hand: phase `manual`, latch cleared, any
    /// rollout cancelled. Emits no event; the caller applies the new weight.
    pub fn set_weight(&mut self, pct: f64, actor: Actor) -> Result<Option<Event>, RolloutError> {
        let bp = basis_points(pct).ok_or(RolloutError::InvalidWeight { got: pct })?;
        let from = self.weight_bp;
        self.phase = Phase::Manual;
        self.weight_bp = bp;
        self.latched = false;
        self.resume = None;
        self.shadow_hold = None;
        self.reason = format!("canary weight set to {}% by {actor}", percent(bp));
        self.record(from, actor, self.reason.clone());
        Ok(None)
    }

    /// Starts a progressive rollout at its first step: phase `progressing`,
    /// latch cleared. `steps` are percentages, strictly increasing, each in
    /// (0, 100], rounded to 0.01%, and the last must be 100: a rollout ends
    /// in promotion (to stop part-way, set a weight instead).
    /// `canary_requests` is the cumulative canary count, the base for the
    /// first step's `min_requests_per_step`.
    pub fn start_rollout(
        &mut self,
        steps: &[f64],
        hold: Duration,
        now: Instant,
        canary_requests: u64,
    ) -> Result<Option<Event>, RolloutError> {
        self.start_rollout_with_shadow(steps, hold, None, now, canary_requests)
    }

    /// [`Rollout::start_rollout`], whose first step, with `shadow` as
    /// `(hold, percent)`, is phase `shadowing`: no user reaches the canary,
    /// `percent` of stable's eligible requests are copied to it, and after
    /// `hold` (and the step's minimum requests, as any step) a healthy
    /// canary moves to the first weight step.
    pub fn start_rollout_with_shadow(
        &mut self,
        steps: &[f64],
        hold: Duration,
        shadow: Option<(Duration, f64)>,
        now: Instant,
        canary_requests: u64,
    ) -> Result<Option<Event>, RolloutError> {
        let steps = validate_steps(steps)?;
        let shadow = shadow
            .map(|(hold, pct)| shadow_basis_points(pct).map(|bp| (hold, bp)))
            .transpose()?;
        let from = self.weight_bp;
        self.steps = steps;
        self.hold = hold;
        self.latched = false;
        self.resume = None;
        let event = if let Some((shadow_hold, bp)) = shadow {
            self.phase = Phase::Shadowing;
            self.shadow_bp = bp;
            self.shadow_hold = Some(shadow_hold);
            self.enter_step(0, now, canary_requests);
            self.weight_bp = 0;
            self.reason = format!(
                "rollout started: shadowing {}% for {} before step 1 of {} ({}%), hold {}",
                percent(bp),
                Secs(shadow_hold),
                self.steps.len(),
                self.steps[0],
                Secs(hold)
            );
            Event::Shadowing
        } else {
            self.enter_first_step(now, canary_requests);
            self.reason = format!(
                "rollout started: step 1 of {} ({}%), hold {}",
                self.steps.len(),
                percent(self.weight_bp),
                Secs(hold)
            );
            Event::Step
        };
        self.record(from, Actor::Api, self.reason.clone());
        Ok(Some(event))
    }

    /// Starts shadowing by hand: phase `shadowing`, weight 0 (no user
    /// reaches the canary), `pct` percent of stable's eligible requests
    /// copied to it, latch cleared, any rollout cancelled. It lasts until a
    /// rollback (the judge's included), promote, weight or rollout.
    pub fn start_shadow(
        &mut self,
        pct: f64,
        actor: Actor,
        now: Instant,
        canary_requests: u64,
    ) -> Result<Option<Event>, RolloutError> {
        let bp = shadow_basis_points(pct)?;
        let from = self.weight_bp;
        self.phase = Phase::Shadowing;
        self.weight_bp = 0;
        self.shadow_bp = bp;
        self.shadow_hold = None;
        self.latched = false;
        self.resume = None;
        self.step = 0;
        self.step_started = now;
        self.step_base_requests = canary_requests;
        self.reason = format!(
            "shadowing {}% of eligible requests by {actor}; no user reaches the canary",
            percent(bp)
        );
        self.record(from, actor, self.reason.clone());
        Ok(Some(Event::Shadowing))
    }

    /// Freezes a running rollout at its step (the judge still guards it).
    /// Pausing a paused rollout does nothing.
    pub fn pause(&mut self, actor: Actor) -> Result<Option<Event>, RolloutError> {
        match self.phase {
            Phase::Paused => Ok(None),
            Phase::Progressing => {
                self.phase = Phase::Paused;
                self.reason = format!(
                    "rollout paused at step {} ({}%) by {actor}",
                    self.step + 1,
                    percent(self.weight_bp)
                );
                self.record(self.weight_bp, actor, self.reason.clone());
                Ok(Some(Event::Paused))
            }
            Phase::RolledBack => Err(RolloutError::Latched),
            phase => Err(RolloutError::NotProgressing { phase }),
        }
    }

    /// Continues a paused rollout, or brings back a rolled-back canary.
    ///
    /// - `paused` → `progressing`; the current step starts over (its hold
    ///   and request count restart at `now`), so a resumed step is judged on
    ///   fresh traffic.
    /// - `rolled_back` → the phase and weight it had when it was reverted
    ///   (a rollout resumes at the step it was on, starting that step over).
    ///   This is one of the explicit calls that lifts the latch.
    /// - `progressing` → nothing (already running).
    ///
    /// Returns [`Event::Step`] when a rollout's step is entered again.
    pub fn resume(
        &mut self,
        now: Instant,
        canary_requests: u64,
        actor: Actor,
    ) -> Result<Option<Event>, RolloutError> {
        let from = self.weight_bp;
        match (self.phase, self.resume) {
            (Phase::Progressing, _) => return Ok(None),
            (Phase::Paused, _) => self.phase = Phase::Progressing,
            (Phase::RolledBack, Some(point)) => {
                self.phase = point.phase;
                self.weight_bp = point.canary_weight_bp;
                self.latched = false;
                self.resume = None;
            }
            (phase, _) => return Err(RolloutError::NothingToResume { phase }),
        }
        let event = if self.phase == Phase::Shadowing {
            self.step_started = now;
            self.step_base_requests = canary_requests;
            self.blocked_sent = false;
            self.reason = format!("shadowing {}% resumed by {actor}", percent(self.shadow_bp));
            Some(Event::Shadowing)
        } else if self.phase == Phase::Progressing {
            self.enter_step(self.step, now, canary_requests);
            self.reason = format!(
                "rollout resumed at step {} ({}%) by {actor}",
                self.step + 1,
                percent(self.weight_bp)
            );
            Some(Event::Step)
        } else {
            self.reason = format!(
                "{} at {}% resumed by {actor}",
                self.phase,
                percent(self.weight_bp)
            );
            None
        };
        self.record(from, actor, self.reason.clone());
        Ok(event)
    }

    /// Sends all traffic to the canary: phase `promoted`. Refused while
    /// rolled back (the latch is lifted only by a weight, rollout or resume);
    /// promoting twice does nothing.
    pub fn promote(&mut self, actor: Actor) -> Result<Option<Event>, RolloutError> {
        match self.phase {
            Phase::RolledBack => Err(RolloutError::Latched),
            Phase::Promoted => Ok(None),
            _ => {
                self.promote_now(actor, format!("promoted by {actor}"));
                Ok(Some(Event::Promoted))
            }
        }
    }

    /// Reverts the canary to 0 and latches it: phase `rolled_back`. Rolling
    /// back twice does nothing (the first reason stays). Remembers where
    /// [`Rollout::resume`] should return.
    pub fn rollback(&mut self, actor: Actor, reason: String) -> Option<Event> {
        if self.phase == Phase::RolledBack {
            return None;
        }
        let from = self.weight_bp;
        self.resume = (from > 0 || self.phase == Phase::Shadowing).then_some(ResumePoint {
            phase: match self.phase {
                Phase::Paused => Phase::Progressing,
                phase => phase,
            },
            canary_weight_bp: from,
        });
        self.phase = Phase::RolledBack;
        self.weight_bp = 0;
        self.latched = true;
        self.reason = reason;
        self.record(from, actor, self.reason.clone());
        Some(Event::Rollback)
    }

    /// Applies the judge's verdict at `now`. `canary_requests_total` is the
    /// cumulative canary count ([`serin_proxy::Stats::request_count`]).
    ///
    /// - A breach while the canary has weight reverts it (actor `judge`).
    /// - In `progressing`, once the hold has elapsed: with fewer than
    ///   `min_requests_per_step` canary requests since the step began, or
    ///   too few in the window for a verdict, the step holds and says why
    ///   ([`Event::JudgeBlocked`] once per step); otherwise a healthy verdict
    ///   advances to the next step, or after the last one promotes.
    pub fn tick(
        &mut self,
        now: Instant,
        canary_requests_total: u64,
        verdict: &Verdict,
        min_requests_per_step: u64,
    ) -> Option<Event> {
        if verdict.is_breach() {
            return self.guard(verdict);
        }
        let hold = match (self.phase, self.shadow_hold) {
            (Phase::Progressing, _) => self.hold,
            (Phase::Shadowing, Some(hold)) => hold,
            _ => return None,
        };
        if now.saturating_duration_since(self.step_started) < hold {
            return None;
        }
        let served = canary_requests_total.saturating_sub(self.step_base_requests);
        let step = self.step + 1;
        let pct = percent(self.weight_bp);
        let what = if self.phase == Phase::Shadowing {
            format!("the shadow ({}%)", percent(self.shadow_bp))
        } else {
            format!("step {step} ({pct}%)")
        };
        let holding = if served < min_requests_per_step {
            Some(format!(
                "holding {what}: {served} of {min_requests_per_step} canary \
                 requests since step start"
            ))
        } else if let Verdict::Insufficient { .. } = verdict {
            Some(format!("holding {what}: {verdict}"))
        } else {
            None
        };
        if let Some(reason) = holding {
            self.reason = reason;
            return (!std::mem::replace(&mut self.blocked_sent, true))
                .then_some(Event::JudgeBlocked);
        }
        if self.phase == Phase::Shadowing {
            self.enter_first_step(now, canary_requests_total);
            self.reason = format!(
                "step 1 of {} ({}%): the shadow healthy over {} and {served} shadow requests",
                self.steps.len(),
                percent(self.weight_bp),
                Secs(hold),
            );
            self.record(0, Actor::Judge, self.reason.clone());
            return Some(Event::Step);
        }
        if self.step + 1 == self.steps.len() {
            self.promote_now(
                Actor::Judge,
                format!(
                    "rollout complete: healthy at step {step} ({pct}%) \
                     after {served} canary requests"
                ),
            );
            return Some(Event::Promoted);
        }
        let from = self.weight_bp;
        self.enter_step(self.step + 1, now, canary_requests_total);
        self.reason = format!(
            "step {} of {} ({}%): step {step} ({pct}%) healthy \
             over {} hold and {served} canary requests",
            self.step + 1,
            self.steps.len(),
            percent(self.weight_bp),
            Secs(self.hold),
        );
        self.record(from, Actor::Judge, self.reason.clone());
        Some(Event::Step)
    }

    /// The part of [`Rollout::tick`] that only ever lowers the weight: a
    /// breach while the canary has weight, or is shadowed, reverts it
    /// (actor `judge`; a shadow's reason says `shadow:`). A fleet member
    /// runs only this; its fleet's leader moves the steps.
    pub fn guard(&mut self, verdict: &Verdict) -> Option<Event> {
        match verdict {
            Verdict::Breach { reason } if self.phase == Phase::Shadowing => {
                self.rollback(Actor::Judge, format!("shadow: {reason}"))
            }
            Verdict::Breach { reason } if self.weight_bp > 0 => {
                self.rollback(Actor::Judge, reason.clone())
            }
            _ => None,
        }
    }

    /// Takes over `state` (the fleet's rollout) whole, keeping this
    /// rollout's own history and adding one transition, by
    /// [`Actor::Fleet`], that says what changed and why. A running rollout's
    /// step clock restarts at `now` and `canary_requests`.
    pub fn adopt(
        &mut self,
        state: RolloutState,
        now: Instant,
        canary_requests: u64,
    ) -> Result<(), RolloutError> {
        let history = std::mem::take(&mut self.history);
        let from = self.weight_bp;
        let mut adopted = Rollout::from_state(state, now, canary_requests)?;
        adopted.history = history;
        let reason = format!("fleet: {}", adopted.reason);
        *self = adopted;
        self.record(from, Actor::Fleet, reason);
        Ok(())
    }

    /// Phase `progressing` at the rollout's first weight step.
    fn enter_first_step(&mut self, now: Instant, canary_requests: u64) {
        self.phase = Phase::Progressing;
        self.shadow_hold = None;
        self.enter_step(0, now, canary_requests);
    }

    fn enter_step(&mut self, index: usize, now: Instant, canary_requests: u64) {
        self.step = index;
        self.weight_bp = basis_points(self.steps[index]).unwrap_or(0);
        self.step_started = now;
        self.step_base_requests = canary_requests;
        self.blocked_sent = false;
    }

    fn promote_now(&mut self, actor: Actor, reason: String) {
        let from = self.weight_bp;
        self.phase = Phase::Promoted;
        self.weight_bp = MAX_BASIS_POINTS;
        self.latched = false;
        self.resume = None;
        self.shadow_hold = None;
        self.reason = reason;
        self.record(from, actor, self.reason.clone());
    }

    fn record(&mut self, from_bp: u16, actor: Actor, reason: String) {
        if self.history.len() >= HISTORY_LIMIT {
            self.history.pop_front();
        }
        self.history.push_back(Transition {
            at: rfc3339(SystemTime::now()),
            from: percent(from_bp),
            to: percent(self.weight_bp),
            phase: self.phase,
            reason,
            actor,
        });
    }
}

/// Checks rollout steps (see [`Rollout::start_rollout`]) and rounds them to
/// 0.01%.
pub fn validate_steps(steps: &[f64]) -> Result<Vec<f64>, RolloutError> {
    if steps.is_empty() {
        return Err(RolloutError::EmptySteps);
    }
    if steps.len() > MAX_STEPS {
        return Err(RolloutError::TooManySteps { got: steps.len() });
    }
    let mut out = Vec::with_capacity(steps.len());
    let mut prev: Option<(f64, u16)> = None;
    for &step in steps {
        let bp = basis_points(step)
            .filter(|&bp| bp > 0)
            .ok_or(RolloutError::StepOutOfRange { got: step })?;
        if let Some((prev, prev_bp)) = prev {
            if bp <= prev_bp {
                return Err(RolloutError::StepsNotIncreasing { prev, next: step });
            }
        }
        prev = Some((step, bp));
        out.push(percent(bp));
    }
    let last = steps[steps.len() - 1];
    if basis_points(last) != Some(MAX_BASIS_POINTS) {
        return Err(RolloutError::LastStepNot100 { last });
    }
    Ok(out)
}

/// A shadow share (percent, in (0, 100]) in basis points.
pub fn shadow_basis_points(pct: f64) -> Result<u16, RolloutError> {
    basis_points(pct)
        .filter(|&bp| bp > 0)
        .ok_or(RolloutError::InvalidShadowPercent { got: pct })
}

/// Parses a hold as users write it: whole numbers with a unit, `ms`, `s`,
/// `m` or `h`, optionally combined (`60s`, `5m`, `1m30s`, `500ms`).
pub fn parse_hold(text: &str) -> Result<Duration, RolloutError> {
    let invalid = || RolloutError::InvalidHold {
        got: text.to_string(),
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(invalid)?;
        let value: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit] {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            _ => return Err(invalid()),
        };
        total = total.saturating_add(part);
        rest = &rest[unit..];
    }
    Ok(total)
}

/// A percentage (0..=100, finite) in basis points, rounded to 0.01%.
pub fn basis_points(pct: f64) -> Option<u16> {
    if !pct.is_finite() || !(0.0..=100.0).contains(&pct) {
        return None;
    }
    Some((pct * 100.0).round() as u16)
}

/// Basis points as a percentage: 1250 → 12.5.
pub fn percent(bp: u16) -> f64 {
    f64::from(bp) / 100.0
}

/// Formats a wall-clock time as RFC 3339 UTC with milliseconds, e.g.
/// `2026-11-23T04:40:00.123Z`. Times before 1970 print as the epoch.
pub fn rfc3339(t: SystemTime) -> String {
    String::from_utf8_lossy(&serin_proxy::wallclock::rfc3339_millis(t)).into_owned()
}

#[cfg(test)]
mod tests;
