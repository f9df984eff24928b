//! The fleet's rollout transitions, as pure functions over a
//! [`SerinRolloutStatus`]: reconciling a new spec, the operators' calls, a
//! member's rollback and the leader's steps.
//!
//! They reuse the one-process [`Rollout`] state machine, so a fleet follows
//! exactly the rules of a single serin; this module only adds what a shared
//! object needs:
//! - the **epoch**, which counts explicit raises (`weight`, `rollout`, and
//!   `resume` of a rolled-back canary). A member's rollback applies to the
//!   epoch it was decided in; a write from an older epoch never lands, and
//!   nothing in the same epoch undoes it.
//! - the step clock in wall time (`stepStartTime`), so any member can take
//!   over as leader mid-step.
//! - who acted (`actor`): a pod, `api@POD`, `cli`, or `leader@POD`.
//!
//! Every function returns the new status, or `None` when nothing changes;
//! the caller writes it with the object's `resourceVersion` as a
//! precondition and starts again from a fresh read on a conflict.

use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::crd::{
    AppliedSpec, Condition, FleetTransition, ResumeStatus, SerinRollout, SerinRolloutSpec,
    SerinRolloutStatus, STATUS_HISTORY_LIMIT,
};
use crate::defaults::duration_text;
use crate::judge::Verdict;
use crate::rollout::{
    basis_points, parse_hold, percent, rfc3339, shadow_basis_points, Actor, Phase, ResumePoint,
    Rollout, RolloutError, RolloutState,
};

/// What a member's config says when the spec leaves a rollout key out.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutDefaults {
    /// `rollout.steps`, percent.
    pub steps: Vec<f64>,
    /// `rollout.hold`.
    pub hold: Duration,
    /// `rollout.min_requests_per_step`.
    pub min_requests_per_step: u64,
    /// `shadow.percent`: the share a rollout's shadow step copies.
    pub shadow_percent: f64,
}

/// An operator's call that acts on the status directly.
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    /// Canary to 100%: phase `promoted`.
    Promote,
    /// Canary to 0, latched.
    Rollback,
    /// A rolled-back canary back to where it was (a new epoch), or a paused
    /// rollout running again.
    Resume,
}

/// Parses a phase name as the status writes it.
pub fn parse_phase(text: &str) -> Option<Phase> {
    serde_json::from_value(Value::String(text.to_string())).ok()
}

/// The status's rollout in the state machine's persisted form (no history).
/// A status never written (no phase yet) is a steady rollout at 0.
pub fn rollout_state(
    status: &SerinRolloutStatus,
    defaults: &RolloutDefaults,
) -> Result<RolloutState, RolloutError> {
    let invalid = |what: String| RolloutError::InvalidState(what);
    if status.phase.is_empty() {
        return Ok(RolloutState {
            phase: Phase::Steady,
            canary_weight_bp: 0,
            steps: defaults.steps.clone(),
            step: 0,
            hold_ms: millis(defaults.hold),
            latched: false,
            reason: String::new(),
            resume: None,
            history: Default::default(),
            shadow_bp: 0,
            shadow_hold_ms: None,
        });
    }
    let phase = parse_phase(&status.phase)
        .ok_or_else(|| invalid(format!("unknown phase {:?}", status.phase)))?;
    let hold = if status.hold.is_empty() {
        defaults.hold
    } else {
        parse_hold(&status.hold)?
    };
    let resume = match &status.resume {
        None => None,
        Some(r) => Some(ResumePoint {
            phase: parse_phase(&r.phase)
                .ok_or_else(|| invalid(format!("unknown resume phase {:?}", r.phase)))?,
            canary_weight_bp: r.weight_bp,
        }),
    };
    let steps = if status.steps.is_empty() {
        defaults.steps.clone()
    } else {
        status.steps.clone()
    };
    let shadow_hold = match status.shadow_hold.as_str() {
        "" => None,
        text => Some(millis(parse_hold(text)?)),
    };
    Ok(RolloutState {
        phase,
        canary_weight_bp: status.weight_bp,
        step: (status.step as usize).saturating_sub(1),
        steps,
        hold_ms: millis(hold),
        latched: status.latched,
        reason: status.reason.clone(),
        resume,
        history: Default::default(),
        shadow_bp: status.shadow_bp,
        shadow_hold_ms: shadow_hold,
    })
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// Writes `rollout` into `status`, with its new transitions (by `actor`)
/// appended to the history.
fn write_rollout(status: &mut SerinRolloutStatus, rollout: &Rollout, actor: &str) {
    let snapshot = rollout.snapshot();
    let state = rollout.to_state();
    status.phase = state.phase.as_str().to_string();
    status.weight_bp = state.canary_weight_bp;
    status.canary_weight = percent(state.canary_weight_bp);
    status.step = snapshot.step as u32;
    status.steps = state.steps;
    status.hold = duration_text(Duration::from_millis(state.hold_ms));
    status.latched = state.latched;
    status.reason = state.reason;
    status.shadow_bp = state.shadow_bp;
    status.shadow_hold = state
        .shadow_hold_ms
        .map(|ms| duration_text(Duration::from_millis(ms)))
        .unwrap_or_default();
    status.resume = state.resume.map(|r| ResumeStatus {
        phase: r.phase.as_str().to_string(),
        weight_bp: r.canary_weight_bp,
    });
    if !rollout.history().is_empty() {
        status.actor = actor.to_string();
    }
    for t in rollout.history() {
        status.history.push(FleetTransition {
            at: t.at.clone(),
            from: t.from,
            to: t.to,
            phase: t.phase.as_str().to_string(),
            reason: t.reason.clone(),
            actor: actor.to_string(),
        });
    }
    let excess = status.history.len().saturating_sub(STATUS_HISTORY_LIMIT);
    status.history.drain(..excess);
}

/// The status as a state machine with no history, its step clock set so
/// that the step began at `stepStartTime` (or now).
fn machine(
    status: &SerinRolloutStatus,
    defaults: &RolloutDefaults,
    now: SystemTime,
) -> Result<(Rollout, Instant), RolloutError> {
    let clock = Instant::now();
    let elapsed = status
        .step_start_time
        .as_deref()
        .and_then(parse_time)
        .and_then(|t| now.duration_since(t).ok())
        .unwrap_or_default();
    let started = clock.checked_sub(elapsed).unwrap_or(clock);
    let state = rollout_state(status, defaults)?;
    Ok((Rollout::from_state(state, started, 0)?, clock))
}

/// The epoch of an explicit raise: above every epoch the status or any
/// member has run, so it beats even a status restored from an old copy (a
/// member ignores a status from an epoch older than its own).
fn next_epoch(status: &SerinRolloutStatus) -> u64 {
    let members = status.fleet.as_ref().map_or(0, |f| f.highest_member_epoch);
    status.epoch.max(members) + 1
}

/// Parses an RFC 3339 time.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    text.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(SystemTime::from)
}

/// A phase whose hold runs on the step clock: a rollout's steps, and its
/// shadow step (a shadow by hand has no hold, and its clock is not read).
fn clocked(phase: &str) -> bool {
    phase == Phase::Progressing.as_str() || phase == Phase::Shadowing.as_str()
}

fn starts_step(before: &SerinRolloutStatus, after: &SerinRolloutStatus) -> bool {
    clocked(&after.phase)
        && (before.phase != after.phase || before.step != after.step || before.epoch != after.epoch)
}

/// Sets the step clock when a step was entered, clears it outside a rollout.
fn stamp_step(before: &SerinRolloutStatus, after: &mut SerinRolloutStatus, now: SystemTime) {
    if starts_step(before, after) {
        after.step_start_time = Some(rfc3339(now));
    } else if !clocked(&after.phase) && after.phase != Phase::Paused.as_str() {
        after.step_start_time = None;
    }
}

fn set_condition(
    status: &mut SerinRolloutStatus,
    kind: &str,
    on: bool,
    reason: &str,
    message: String,
    generation: i64,
    now: SystemTime,
) {
    let value = if on { "True" } else { "False" };
    let at = rfc3339(now);
    match status.conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = at;
            }
            c.status = value.to_string();
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = generation;
        }
        None => status.conditions.push(Condition {
            type_: kind.to_string(),
            status: value.to_string(),
            reason: reason.to_string(),
            message,
            last_transition_time: at,
            observed_generation: generation,
        }),
    }
}

fn set_rolled_back_condition(status: &mut SerinRolloutStatus, generation: i64, now: SystemTime) {
    let (on, reason) = if status.latched {
        (true, "CanaryRolledBack")
    } else {
        (false, "CanaryNotRolledBack")
    };
    let message = if on {
        status.reason.clone()
    } else {
        String::new()
    };
    set_condition(status, "RolledBack", on, reason, message, generation, now);
}

/// The spec's weight-or-rollout part.
fn strategy(spec: &SerinRolloutSpec) -> AppliedSpec {
    AppliedSpec {
        canary_weight: spec.canary_weight,
        rollout: spec.rollout.clone(),
        shadow: spec.shadow,
        restarted_at: spec.restarted_at.clone(),
    }
}

/// Applies a new `metadata.generation` of the spec to the status, if the
/// status has not yet: a changed weight or rollout starts it (a new epoch);
/// `paused` pauses or resumes a rollout; an invalid spec changes nothing
/// but the `SpecApplied` condition, which says what is wrong.
pub fn reconcile(
    object: &SerinRollout,
    defaults: &RolloutDefaults,
    actor: &str,
    now: SystemTime,
) -> Option<SerinRolloutStatus> {
    let generation = object.metadata.generation.unwrap_or(0);
    let before = object.status.clone().unwrap_or_default();
    if before.observed_generation == generation && !before.phase.is_empty() {
        return None;
    }
    let mut after = before.clone();
    after.observed_generation = generation;
    match reconciled(object, &before, defaults, actor, now) {
        Ok(next) => {
            if let Some(next) = next {
                after = next;
                after.observed_generation = generation;
            }
            set_condition(
                &mut after,
                "SpecApplied",
                true,
                "Applied",
                format!("generation {generation} applied"),
                generation,
                now,
            );
        }
        Err(e) => set_condition(
            &mut after,
            "SpecApplied",
            false,
            "InvalidSpec",
            e.to_string(),
            generation,
            now,
        ),
    }
    if after.phase.is_empty() {
        // A fresh object: write the steady state, so members have one to read.
        let (rollout, _) = machine(&after, defaults, now).ok()?;
        write_rollout(&mut after, &rollout, actor);
    }
    set_rolled_back_condition(&mut after, generation, now);
    Some(after)
}

fn reconciled(
    object: &SerinRollout,
    before: &SerinRolloutStatus,
    defaults: &RolloutDefaults,
    actor: &str,
    now: SystemTime,
) -> Result<Option<SerinRolloutStatus>, Box<dyn std::error::Error>> {
    let spec = &object.spec;
    if spec.canary_weight.is_some() && spec.rollout.is_some() {
        return Err("give spec.canaryWeight or spec.rollout, not both".into());
    }
    if spec.shadow.is_some() && (spec.canary_weight.is_some() || spec.rollout.is_some()) {
        return Err("give spec.shadow alone, without spec.canaryWeight or spec.rollout".into());
    }
    if let Some(judge) = &spec.judge {
        super::judge_settings(judge, &crate::config::JudgeSettings::default())
            .map_err(|e| format!("spec.judge: {e}"))?;
    }
    let (mut rollout, clock) = machine(before, defaults, now)?;
    let wanted = strategy(spec);
    let mut after = before.clone();
    let changed = before.applied.as_ref() != Some(&wanted)
        && (wanted.canary_weight.is_some() || wanted.rollout.is_some() || wanted.shadow.is_some());
    if changed {
        if let Some(pct) = spec.canary_weight {
            rollout.set_weight(pct, Actor::Api)?;
        } else if let Some(pct) = spec.shadow {
            rollout.start_shadow(pct, Actor::Api, clock, 0)?;
        } else if let Some(plan) = &spec.rollout {
            let steps = plan.steps.clone().unwrap_or_else(|| defaults.steps.clone());
            let hold = match &plan.hold {
                Some(text) => parse_hold(text)?,
                None => defaults.hold,
            };
            let shadow = match &plan.shadow {
                Some(text) => match parse_hold(text)? {
                    d if d.is_zero() => {
                        return Err("spec.rollout.shadow must be longer than 0s, e.g. 60s".into())
                    }
                    d => Some((d, defaults.shadow_percent)),
                },
                None => None,
            };
            rollout.start_rollout_with_shadow(&steps, hold, shadow, clock, 0)?;
            after.min_requests_per_step = plan
                .min_requests_per_step
                .unwrap_or(defaults.min_requests_per_step);
        }
        after.epoch = next_epoch(before);
        after.applied = Some(wanted);
    }
    match (spec.paused, rollout.phase()) {
        (true, Phase::Progressing) => {
            rollout.pause(Actor::Api)?;
        }
        (false, Phase::Paused) => {
            rollout.resume(clock, 0, Actor::Api)?;
        }
        _ => {}
    }
    if rollout.history().is_empty() && !changed {
        return Ok(None);
    }
    write_rollout(&mut after, &rollout, actor);
    if clocked(&after.phase) && (changed || before.phase != after.phase) {
        after.step_start_time = Some(rfc3339(now));
    } else {
        stamp_step(before, &mut after, now);
    }
    Ok(Some(after))
}

/// An operator's call on the status (`serin promote|rollback|resume
/// --fleet`, or a member's control API). `Ok(None)` when it changes nothing
/// (promoting twice).
pub fn call(
    status: &SerinRolloutStatus,
    call: &Call,
    defaults: &RolloutDefaults,
    actor: &str,
    now: SystemTime,
) -> Result<Option<SerinRolloutStatus>, RolloutError> {
    let (mut rollout, clock) = machine(status, defaults, now)?;
    let mut after = status.clone();
    let event = match call {
        Call::Promote => rollout.promote(Actor::Api)?,
        Call::Rollback => rollout.rollback(Actor::Api, format!("rolled back by {actor}")),
        Call::Resume => {
            let was_latched = rollout.latched();
            let event = rollout.resume(clock, 0, Actor::Api)?;
            if was_latched {
                after.epoch = next_epoch(status);
            }
            event
        }
    };
    if event.is_none() && rollout.history().is_empty() {
        return Ok(None);
    }
    write_rollout(&mut after, &rollout, actor);
    stamp_step(status, &mut after, now);
    if clocked(&after.phase) && status.phase != after.phase {
        after.step_start_time = Some(rfc3339(now));
    }
    set_rolled_back_condition(&mut after, status.observed_generation, now);
    Ok(Some(after))
}

/// A member's local judge rolled it back in `epoch`: the fleet rolls back
/// too, unless it already has, or has moved on to a newer epoch (an
/// operator raised the canary again since; the member will follow).
pub fn member_rollback(
    status: &SerinRolloutStatus,
    epoch: u64,
    reason: &str,
    pod: &str,
    defaults: &RolloutDefaults,
    now: SystemTime,
) -> Option<SerinRolloutStatus> {
    if status.epoch != epoch || status.latched {
        return None;
    }
    let (mut rollout, _) = machine(status, defaults, now).ok()?;
    rollout.rollback(Actor::Judge, format!("{reason} (judge of {pod})"))?;
    let mut after = status.clone();
    write_rollout(&mut after, &rollout, pod);
    stamp_step(status, &mut after, now);
    set_rolled_back_condition(&mut after, status.observed_generation, now);
    Some(after)
}

/// The leader's look at the fleet: a breach of the aggregate reverts it;
/// in `progressing`, a step advances once its hold has passed, the fleet
/// served `step_requests` ≥ `min_requests_per_step` canary requests on it,
/// and the aggregate is healthy. A hold only changes the reason, and
/// `None` is returned for that unless `reason_changes` is true (the
/// caller rate-limits such writes).
pub fn leader_tick(
    status: &SerinRolloutStatus,
    verdict: &Verdict,
    step_requests: u64,
    leader: &str,
    defaults: &RolloutDefaults,
    now: SystemTime,
    reason_changes: bool,
) -> Option<SerinRolloutStatus> {
    let (mut rollout, clock) = machine(status, defaults, now).ok()?;
    let min = if status.min_requests_per_step > 0 {
        status.min_requests_per_step
    } else {
        defaults.min_requests_per_step
    };
    let event = rollout.tick(clock, step_requests, verdict, min);
    let mut after = status.clone();
    let actor = format!("leader@{leader}");
    if event.is_some() && !rollout.history().is_empty() {
        write_rollout(&mut after, &rollout, &actor);
        if let Some(last) = after.history.last_mut() {
            if verdict.is_breach() {
                last.reason = format!("fleet: {}", last.reason);
                after.reason.clone_from(&last.reason);
            }
        }
        stamp_step(status, &mut after, now);
        set_rolled_back_condition(&mut after, status.observed_generation, now);
        return Some(after);
    }
    if reason_changes && rollout.reason() != status.reason {
        after.reason = rollout.reason().to_string();
        return Some(after);
    }
    None
}

/// The rollout part of a status as a JSON merge patch: every rollout key,
/// with `null` for what is absent, and never `fleet` (the leader's
/// aggregate, written on its own).
pub fn rollout_patch(status: &SerinRolloutStatus, resource_version: &str) -> Value {
    let mut fields: Map<String, Value> = match serde_json::to_value(status) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    fields.remove("fleet");
    for key in [
        "steps",
        "hold",
        "shadowBp",
        "shadowHold",
        "stepStartTime",
        "resume",
        "applied",
        "conditions",
        "history",
    ] {
        fields.entry(key).or_insert(Value::Null);
    }
    json!({
        "metadata": {"resourceVersion": resource_version},
        "status": fields,
    })
}

/// A shadow share in percent as the spec holds it, checked.
pub fn checked_shadow(pct: f64) -> Result<f64, RolloutError> {
    shadow_basis_points(pct).map(percent)
}

/// A weight in percent as the spec holds it, checked.
pub fn checked_weight(pct: f64) -> Result<f64, RolloutError> {
    basis_points(pct)
        .map(percent)
        .ok_or(RolloutError::InvalidWeight { got: pct })
}

#[cfg(test)]
mod tests;
