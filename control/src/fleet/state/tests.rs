use std::time::{Duration, SystemTime};

use super::*;
use crate::fleet::crd::{RolloutSpec, SerinRolloutSpec};
use crate::judge::Verdict;

fn defaults() -> RolloutDefaults {
    RolloutDefaults {
        steps: vec![5.0, 25.0, 50.0, 100.0],
        hold: Duration::from_secs(60),
        min_requests_per_step: 100,
        shadow_percent: 100.0,
    }
}

fn object(
    spec: SerinRolloutSpec,
    generation: i64,
    status: Option<SerinRolloutStatus>,
) -> SerinRollout {
    let mut o = SerinRollout::new("checkout", spec);
    o.metadata.namespace = Some("shop".into());
    o.metadata.generation = Some(generation);
    o.status = status;
    o
}

fn rollout_spec() -> SerinRolloutSpec {
    SerinRolloutSpec {
        rollout: Some(RolloutSpec {
            steps: Some(vec![10.0, 50.0, 100.0]),
            hold: Some("30s".into()),
            min_requests_per_step: Some(40),
            shadow: None,
        }),
        ..Default::default()
    }
}

fn healthy() -> Verdict {
    Verdict::Healthy
}

/// A breach of the aggregate.
fn breach() -> Verdict {
    Verdict::Breach {
        reason: "canary error rate 30% > 5%".into(),
    }
}

/// The steady status a fresh object gets at `now`.
fn steady_at(now: SystemTime) -> SerinRolloutStatus {
    reconcile(
        &object(SerinRolloutSpec::default(), 1, None),
        &defaults(),
        "cli",
        now,
    )
    .expect("a fresh object is written")
}

/// `spec` of `generation` reconciled over `status` by `cli` at `now`.
fn applied(
    spec: SerinRolloutSpec,
    generation: i64,
    status: Option<SerinRolloutStatus>,
    now: SystemTime,
) -> SerinRolloutStatus {
    reconcile(&object(spec, generation, status), &defaults(), "cli", now).expect("a new status")
}

/// The status's `SpecApplied` condition.
fn spec_applied(status: &SerinRolloutStatus) -> &Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "SpecApplied")
        .expect("a SpecApplied condition")
}

#[test]
fn a_fresh_object_gets_a_steady_status_and_a_rollout_spec_starts_epoch_one() {
    let now = SystemTime::now();
    let steady = reconcile(
        &object(SerinRolloutSpec::default(), 1, None),
        &defaults(),
        "cli",
        now,
    )
    .expect("a fresh object is written");
    assert_eq!(
        (steady.phase.as_str(), steady.weight_bp, steady.epoch),
        ("steady", 0, 0)
    );
    assert_eq!(steady.observed_generation, 1);

    let started = reconcile(
        &object(rollout_spec(), 2, Some(steady)),
        &defaults(),
        "cli",
        now,
    )
    .expect("generation 2 applied");
    assert_eq!(started.phase, "progressing");
    assert_eq!(
        (started.weight_bp, started.step, started.epoch),
        (1000, 1, 1)
    );
    assert_eq!(started.steps, vec![10.0, 50.0, 100.0]);
    assert_eq!(
        (started.hold.as_str(), started.min_requests_per_step),
        ("30s", 40)
    );
    assert_eq!(started.actor, "cli");
    assert!(started.step_start_time.is_some());
    // Applied once: the same generation does nothing.
    let same = object(rollout_spec(), 2, Some(started.clone()));
    assert_eq!(reconcile(&same, &defaults(), "leader@a", now), None);
    // `paused` alone pauses; it does not restart the rollout or the epoch.
    let mut paused = rollout_spec();
    paused.paused = true;
    let p = applied(paused, 3, Some(started), now);
    assert_eq!(
        (p.phase.as_str(), p.weight_bp, p.epoch),
        ("paused", 1000, 1)
    );
}

#[test]
fn an_invalid_spec_changes_nothing_but_says_why() {
    let now = SystemTime::now();
    let steady = steady_at(now);
    let mut both = rollout_spec();
    both.canary_weight = Some(5.0);
    let s = applied(both, 2, Some(steady.clone()), now);
    assert_eq!((s.phase.as_str(), s.weight_bp, s.epoch), ("steady", 0, 0));
    let cond = spec_applied(&s);
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(cond.message.contains("not both"), "{}", cond.message);

    let mut bad_steps = rollout_spec();
    bad_steps.rollout.as_mut().unwrap().steps = Some(vec![10.0, 50.0]);
    let s = applied(bad_steps, 3, Some(steady), now);
    let cond = spec_applied(&s);
    assert!(
        cond.message.contains("last rollout step must be 100"),
        "{}",
        cond.message
    );
    assert_eq!(s.weight_bp, 0);
}

#[test]
fn a_member_rollback_lands_only_in_its_own_epoch_and_is_never_undone_within_it() {
    let now = SystemTime::now();
    let steady = steady_at(now);
    let running = reconcile(
        &object(rollout_spec(), 2, Some(steady)),
        &defaults(),
        "cli",
        now,
    )
    .unwrap();
    assert_eq!(running.epoch, 1);

    // A breach decided in epoch 0 (before the operator's rollout) is stale.
    assert_eq!(
        member_rollback(
            &running,
            0,
            "5 consecutive canary errors",
            "pod-a",
            &defaults(),
            now
        ),
        None
    );
    let back = member_rollback(
        &running,
        1,
        "5 consecutive canary errors",
        "pod-a",
        &defaults(),
        now,
    )
    .expect("same epoch: the fleet rolls back");
    assert_eq!(
        (back.phase.as_str(), back.weight_bp, back.latched),
        ("rolled_back", 0, true)
    );
    assert_eq!(back.actor, "pod-a");
    assert!(back.reason.contains("judge of pod-a"), "{}", back.reason);
    assert_eq!(back.history.last().unwrap().actor, "pod-a");
    // Twice is once.
    assert_eq!(
        member_rollback(&back, 1, "again", "pod-b", &defaults(), now),
        None
    );
    // The leader cannot step a rolled-back fleet up, nor can promote.
    assert_eq!(
        leader_tick(&back, &healthy(), 10_000, "pod-c", &defaults(), now, true),
        None
    );
    assert!(matches!(
        call(&back, &Call::Promote, &defaults(), "cli", now),
        Err(RolloutError::Latched)
    ));
    // Only an explicit resume raises it again, in a new epoch.
    let resumed = call(&back, &Call::Resume, &defaults(), "cli", now)
        .unwrap()
        .unwrap();
    assert_eq!(
        (resumed.phase.as_str(), resumed.weight_bp, resumed.epoch),
        ("progressing", 1000, 2)
    );
    // ... where the old epoch's rollback no longer lands.
    assert_eq!(
        member_rollback(&resumed, 1, "late", "pod-a", &defaults(), now),
        None
    );
}

#[test]
fn the_leader_steps_after_the_hold_and_the_fleets_requests_and_reverts_on_a_breach() {
    let start = SystemTime::now();
    let steady = steady_at(start);
    let running = reconcile(
        &object(rollout_spec(), 2, Some(steady)),
        &defaults(),
        "cli",
        start,
    )
    .unwrap();
    let later = start + Duration::from_secs(31);
    // Hold not over: nothing (not even a reason).
    assert_eq!(
        leader_tick(
            &running,
            &healthy(),
            1000,
            "a",
            &defaults(),
            start + Duration::from_secs(5),
            true
        ),
        None
    );
    // Hold over, too few fleet requests: holds, and says so when allowed to write.
    assert_eq!(
        leader_tick(&running, &healthy(), 39, "a", &defaults(), later, false),
        None
    );
    let holding = leader_tick(&running, &healthy(), 39, "a", &defaults(), later, true).unwrap();
    assert!(holding.reason.contains("39 of 40"), "{}", holding.reason);
    assert_eq!(holding.weight_bp, 1000);
    // Enough: step 2, a new step clock, same epoch.
    let next = leader_tick(&running, &healthy(), 40, "a", &defaults(), later, false).unwrap();
    assert_eq!((next.step, next.weight_bp, next.epoch), (2, 5000, 1));
    assert_eq!(next.actor, "leader@a");
    assert_eq!(
        next.step_start_time.as_deref(),
        Some(rfc3339(later).as_str())
    );
    // A breach of the aggregate reverts, whatever the hold.
    let back = leader_tick(&next, &breach(), 0, "a", &defaults(), later, false).unwrap();
    assert_eq!((back.phase.as_str(), back.weight_bp), ("rolled_back", 0));
    assert!(back.reason.starts_with("fleet: "), "{}", back.reason);
}

#[test]
fn the_rollout_patch_never_touches_the_aggregate_and_clears_absent_keys() {
    let mut status = SerinRolloutStatus {
        phase: "manual".into(),
        weight_bp: 500,
        ..Default::default()
    };
    status.fleet = Some(Default::default());
    let patch = rollout_patch(&status, "42");
    assert_eq!(patch["metadata"]["resourceVersion"], "42");
    let fields = patch["status"].as_object().unwrap();
    assert!(!fields.contains_key("fleet"));
    assert!(fields["resume"].is_null() && fields["stepStartTime"].is_null());
    assert_eq!(fields["weightBp"], 500);
}

// === shadowing ===

#[test]
fn a_rollouts_shadow_step_is_carried_by_the_status_and_the_leader_moves_it_on() {
    let start = SystemTime::now();
    let steady = steady_at(start);
    let mut spec = rollout_spec();
    spec.rollout.as_mut().unwrap().shadow = Some("20s".into());
    let shadowing = applied(spec, 2, Some(steady), start);
    assert_eq!(
        (
            shadowing.phase.as_str(),
            shadowing.weight_bp,
            shadowing.shadow_bp,
            shadowing.shadow_hold.as_str(),
            shadowing.epoch,
        ),
        ("shadowing", 0, 10_000, "20s", 1)
    );
    assert_eq!(
        shadowing.step_start_time.as_deref(),
        Some(rfc3339(start).as_str()),
        "the shadow step's hold runs on the step clock"
    );
    // Every member reads it back as the same state machine.
    let state = rollout_state(&shadowing, &defaults()).unwrap();
    assert_eq!(
        (state.phase, state.shadow_bp, state.shadow_hold_ms),
        (Phase::Shadowing, 10_000, Some(20_000))
    );
    // Its hold, then the fleet's requests, then the first weight step.
    let early = start + Duration::from_secs(10);
    assert_eq!(
        leader_tick(&shadowing, &healthy(), 1000, "a", &defaults(), early, false),
        None
    );
    let later = start + Duration::from_secs(21);
    let next = leader_tick(&shadowing, &healthy(), 40, "a", &defaults(), later, false).unwrap();
    assert_eq!(
        (
            next.phase.as_str(),
            next.step,
            next.weight_bp,
            next.shadow_hold.as_str()
        ),
        ("progressing", 1, 1000, "")
    );
    assert_eq!(
        next.step_start_time.as_deref(),
        Some(rfc3339(later).as_str())
    );
    // A breach while shadowing reverts, and says it was the shadow.
    let back = leader_tick(&shadowing, &breach(), 0, "a", &defaults(), early, false).unwrap();
    assert_eq!((back.phase.as_str(), back.latched), ("rolled_back", true));
    assert!(
        back.reason.starts_with("fleet: shadow: "),
        "{}",
        back.reason
    );
}

#[test]
fn a_shadow_spec_shadows_the_fleet_and_is_given_alone() {
    let now = SystemTime::now();
    let spec = SerinRolloutSpec {
        shadow: Some(25.0),
        ..Default::default()
    };
    let status = applied(spec, 1, None, now);
    assert_eq!(
        (
            status.phase.as_str(),
            status.weight_bp,
            status.shadow_bp,
            status.epoch
        ),
        ("shadowing", 0, 2500, 1)
    );
    // A member's rollback in its epoch lands.
    let back = member_rollback(
        &status,
        1,
        "shadow: 4 consecutive canary errors",
        "m0",
        &defaults(),
        now,
    )
    .unwrap();
    assert_eq!(back.phase, "rolled_back");
    // With a weight or a rollout too, it is refused and the condition says why.
    let both = SerinRolloutSpec {
        shadow: Some(25.0),
        canary_weight: Some(5.0),
        ..Default::default()
    };
    let refused = applied(both, 2, Some(status.clone()), now);
    assert_eq!(refused.phase, "shadowing", "nothing changed");
    let cond = spec_applied(&refused);
    assert!(
        cond.message.contains("give spec.shadow alone"),
        "{}",
        cond.message
    );
    let zero = SerinRolloutSpec {
        shadow: Some(0.0),
        ..Default::default()
    };
    let refused = applied(zero, 3, Some(status), now);
    let cond = spec_applied(&refused);
    assert!(
        cond.message.contains("shadow percent must be above 0"),
        "{}",
        cond.message
    );
}
