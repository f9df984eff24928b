use std::time::Duration;

use tokio::time::{advance, Instant};

use super::*;
use std::time::UNIX_EPOCH;

const HOLD: Duration = Duration::from_secs(60);
const MIN_PER_STEP: u64 = 50;

fn breach() -> Verdict {
    Verdict::Breach {
        reason: "canary error rate 31.0% > 5.0% over 412 requests (window 10s)".into(),
    }
}

fn insufficient() -> Verdict {
    Verdict::Insufficient {
        canary_requests: 7,
        min_requests: 20,
    }
}

/// A rollout started with the default steps at `canary` cumulative requests.
fn started(canary: u64) -> Rollout {
    let mut r = Rollout::new(Instant::now());
    let event = r
        .start_rollout(
            &crate::defaults::ROLLOUT_STEPS,
            HOLD,
            Instant::now(),
            canary,
        )
        .unwrap();
    assert_eq!(event, Some(Event::Step));
    assert_eq!((r.phase(), r.canary_weight_bp()), (Phase::Progressing, 500));
    r
}

#[tokio::test(start_paused = true)]
async fn step_waits_for_the_hold() {
    let mut r = started(0);
    advance(HOLD - Duration::from_millis(1)).await;
    assert_eq!(
        r.tick(Instant::now(), 1000, &Verdict::Healthy, MIN_PER_STEP),
        None
    );
    assert_eq!(r.canary_weight_bp(), 500);
    advance(Duration::from_millis(1)).await;
    assert_eq!(
        r.tick(Instant::now(), 1000, &Verdict::Healthy, MIN_PER_STEP),
        Some(Event::Step)
    );
    assert_eq!(r.canary_weight_bp(), 2500);
    assert_eq!(r.snapshot().step, 2);
    let last = r.history().back().unwrap();
    assert_eq!((last.from, last.to, last.actor), (5.0, 25.0, Actor::Judge));
}

#[tokio::test(start_paused = true)]
async fn full_rollout_ends_promoted() {
    let mut r = started(0);
    let mut served = 0;
    let mut events = Vec::new();
    for _ in 0..4 {
        advance(HOLD).await;
        served += MIN_PER_STEP;
        events.push(r.tick(Instant::now(), served, &Verdict::Healthy, MIN_PER_STEP));
    }
    assert_eq!(
        events,
        [
            Some(Event::Step),
            Some(Event::Step),
            Some(Event::Step),
            Some(Event::Promoted)
        ]
    );
    assert_eq!((r.phase(), r.canary_weight_bp()), (Phase::Promoted, 10_000));
    let weights: Vec<f64> = r.history().iter().map(|t| t.to).collect();
    assert_eq!(weights, [5.0, 25.0, 50.0, 100.0, 100.0]);
}

#[tokio::test(start_paused = true)]
async fn too_little_traffic_holds_the_step_and_says_so_once() {
    let mut r = started(100);
    advance(HOLD * 3).await;
    let now = Instant::now();
    assert_eq!(
        r.tick(now, 107, &Verdict::Healthy, MIN_PER_STEP),
        Some(Event::JudgeBlocked)
    );
    assert_eq!(
        r.reason(),
        "holding step 1 (5%): 7 of 50 canary requests since step start"
    );
    assert_eq!(r.tick(now, 120, &Verdict::Healthy, MIN_PER_STEP), None);
    assert_eq!(
        r.reason(),
        "holding step 1 (5%): 20 of 50 canary requests since step start"
    );
    assert_eq!(r.canary_weight_bp(), 500);
    assert_eq!(r.phase(), Phase::Progressing);
    // Enough traffic, but the judge cannot see enough of it in its window.
    assert_eq!(r.tick(now, 150, &insufficient(), MIN_PER_STEP), None);
    assert!(
        r.reason().starts_with("holding step 1 (5%): 7 of 20"),
        "{}",
        r.reason()
    );
    assert_eq!(
        r.tick(now, 150, &Verdict::Healthy, MIN_PER_STEP),
        Some(Event::Step)
    );
    // The next step may be blocked again, and says so again.
    advance(HOLD).await;
    assert_eq!(
        r.tick(Instant::now(), 151, &Verdict::Healthy, MIN_PER_STEP),
        Some(Event::JudgeBlocked)
    );
}

#[tokio::test(start_paused = true)]
async fn pause_freezes_and_resume_restarts_the_step() {
    let mut r = started(0);
    advance(HOLD / 2).await;
    assert_eq!(r.pause(Actor::Api), Ok(Some(Event::Paused)));
    assert_eq!(r.pause(Actor::Api), Ok(None));
    advance(HOLD * 2).await;
    assert_eq!(
        r.tick(Instant::now(), 1000, &Verdict::Healthy, MIN_PER_STEP),
        None
    );
    assert_eq!((r.phase(), r.canary_weight_bp()), (Phase::Paused, 500));
    assert_eq!(
        r.resume(Instant::now(), 1000, Actor::Api),
        Ok(Some(Event::Step))
    );
    assert_eq!(r.phase(), Phase::Progressing);
    assert_eq!(r.resume(Instant::now(), 1000, Actor::Api), Ok(None));
    // The step starts over: a full hold and fresh requests are needed.
    advance(HOLD / 2).await;
    assert_eq!(
        r.tick(Instant::now(), 2000, &Verdict::Healthy, MIN_PER_STEP),
        None
    );
    advance(HOLD / 2).await;
    assert_eq!(
        r.tick(Instant::now(), 2000, &Verdict::Healthy, MIN_PER_STEP),
        Some(Event::Step)
    );
}

#[tokio::test(start_paused = true)]
async fn judge_guards_a_paused_rollout() {
    let mut r = started(0);
    r.pause(Actor::Api).unwrap();
    assert_eq!(
        r.tick(Instant::now(), 10, &breach(), MIN_PER_STEP),
        Some(Event::Rollback)
    );
    assert_eq!((r.phase(), r.canary_weight_bp()), (Phase::RolledBack, 0));
}

#[tokio::test(start_paused = true)]
async fn promote_and_its_refusals() {
    let mut r = Rollout::new(Instant::now());
    r.set_weight(10.0, Actor::Api).unwrap();
    assert_eq!(r.promote(Actor::Api), Ok(Some(Event::Promoted)));
    assert_eq!((r.phase(), r.canary_weight_bp()), (Phase::Promoted, 10_000));
    assert_eq!(r.promote(Actor::Api), Ok(None));
    // A promoted canary is still guarded: stable is the fallback.
    assert_eq!(
        r.tick(Instant::now(), 10, &breach(), MIN_PER_STEP),
        Some(Event::Rollback)
    );
    assert_eq!(r.promote(Actor::Api), Err(RolloutError::Latched));
    assert_eq!(r.canary_weight_bp(), 0);
}

#[tokio::test(start_paused = true)]
async fn rollback_is_latched() {
    let mut r = started(0);
    advance(HOLD).await;
    r.tick(Instant::now(), 100, &Verdict::Healthy, MIN_PER_STEP);
    assert_eq!(r.canary_weight_bp(), 2500);
    assert_eq!(
        r.tick(Instant::now(), 110, &breach(), MIN_PER_STEP),
        Some(Event::Rollback)
    );
    assert_eq!((r.phase(), r.canary_weight_bp()), (Phase::RolledBack, 0));
    assert!(r.latched());
    assert!(r.reason().starts_with("canary error rate 31.0%"));
    let last = r.history().back().unwrap();
    assert_eq!((last.from, last.to, last.actor), (25.0, 0.0, Actor::Judge));
    assert_eq!(last.phase, Phase::RolledBack);

    // Hours of healthy verdicts and traffic never bring the canary back.
    let mut served = 110;
    for verdict in [Verdict::Healthy, insufficient(), breach()] {
        for _ in 0..100 {
            advance(HOLD).await;
            served += 1000;
            assert_eq!(r.tick(Instant::now(), served, &verdict, MIN_PER_STEP), None);
            assert_eq!(r.canary_weight_bp(), 0);
        }
    }
    assert_eq!(r.pause(Actor::Api), Err(RolloutError::Latched));
    assert_eq!(r.rollback(Actor::Api, "again".into()), None);
    assert!(r.reason().starts_with("canary error rate 31.0%"));

    // Only an explicit call lifts the latch: resume returns to the step.
    assert_eq!(
        r.resume(Instant::now(), served, Actor::Api),
        Ok(Some(Event::Step))
    );
    assert_eq!(
        (r.phase(), r.canary_weight_bp()),
        (Phase::Progressing, 2500)
    );
    assert!(!r.latched());
}

#[tokio::test(start_paused = true)]
async fn resume_after_a_manual_rollback_restores_the_weight() {
    let mut r = Rollout::new(Instant::now());
    r.set_weight(12.5, Actor::Api).unwrap();
    assert_eq!(
        r.rollback(Actor::Api, "rolled back by api".into()),
        Some(Event::Rollback)
    );
    assert_eq!(r.resume(Instant::now(), 0, Actor::Api), Ok(None));
    assert_eq!((r.phase(), r.canary_weight_bp()), (Phase::Manual, 1250));
    assert_eq!(r.snapshot().canary_weight, 12.5);
}

#[tokio::test(start_paused = true)]
async fn resume_refuses_when_there_is_nothing_to_resume() {
    let mut r = Rollout::new(Instant::now());
    assert_eq!(
        r.resume(Instant::now(), 0, Actor::Api),
        Err(RolloutError::NothingToResume {
            phase: Phase::Steady
        })
    );
    // A rollback from 0 remembers nothing to return to.
    r.rollback(Actor::Api, "rolled back by api".into());
    assert_eq!(
        r.resume(Instant::now(), 0, Actor::Api)
            .unwrap_err()
            .to_string(),
        "nothing to resume: phase is rolled_back; start a rollout or set a weight"
    );
    assert_eq!(
        r.pause(Actor::Api),
        Err(RolloutError::Latched),
        "pause while latched"
    );
    assert_eq!(
        Rollout::new(Instant::now()).pause(Actor::Api),
        Err(RolloutError::NotProgressing {
            phase: Phase::Steady
        })
    );
}

#[tokio::test(start_paused = true)]
async fn set_weight_clears_the_latch_and_cancels_a_rollout() {
    let mut r = started(0);
    r.tick(Instant::now(), 1, &breach(), MIN_PER_STEP);
    assert_eq!(r.set_weight(2.0, Actor::Api), Ok(None));
    assert_eq!((r.phase(), r.canary_weight_bp()), (Phase::Manual, 200));
    assert!(!r.latched());
    assert_eq!(r.snapshot().step, 0);
    advance(HOLD * 10).await;
    assert_eq!(
        r.tick(Instant::now(), 1000, &Verdict::Healthy, MIN_PER_STEP),
        None
    );
    assert_eq!(r.canary_weight_bp(), 200);
    assert_eq!(
        r.set_weight(100.5, Actor::Api).unwrap_err().to_string(),
        "canary weight must be a percentage from 0 to 100 (got 100.5); write 12.5 for 12.5%"
    );
    assert_eq!(r.set_weight(f64::NAN, Actor::Api).map_err(|_| ()), Err(()));
}

#[tokio::test(start_paused = true)]
async fn a_breach_at_zero_weight_changes_nothing() {
    let mut r = Rollout::new(Instant::now());
    assert_eq!(r.tick(Instant::now(), 5, &breach(), MIN_PER_STEP), None);
    assert_eq!(r.phase(), Phase::Steady);
    assert!(r.history().is_empty());
}

#[test]
fn steps_are_validated() {
    let now = Instant::now();
    let mut r = Rollout::new(now);
    let mut err = |steps: &[f64]| {
        r.start_rollout(steps, HOLD, now, 0)
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[]).starts_with("rollout steps must not be empty"));
    assert!(err(&[5.0, 0.0, 100.0]).starts_with("rollout step 0 is outside (0, 100]"));
    assert!(err(&[5.0, 150.0]).starts_with("rollout step 150 is outside"));
    assert_eq!(
        err(&[5.0, 50.0, 25.0, 100.0]),
        "rollout steps must be strictly increasing (got 50 then 25)"
    );
    assert!(err(&[5.0, 5.001, 100.0]).starts_with("rollout steps must be strictly increasing"));
    assert!(err(&[5.0, 50.0]).starts_with("the last rollout step must be 100 (got 50)"));
    assert!(err(&vec![1.0; 101]).starts_with("a rollout has at most 100 steps"));
    assert_eq!(
        r.phase(),
        Phase::Steady,
        "a refused rollout changes nothing"
    );
    assert_eq!(
        r.start_rollout(&[0.01, 12.345, 100.0], HOLD, now, 0),
        Ok(Some(Event::Step))
    );
    assert_eq!(r.snapshot().steps, [0.01, 12.35, 100.0]);
    assert_eq!(r.canary_weight_bp(), 1);
}

#[tokio::test(start_paused = true)]
async fn state_round_trips_and_restarts_the_step_clock() {
    let mut r = started(0);
    advance(HOLD).await;
    r.tick(Instant::now(), 100, &Verdict::Healthy, MIN_PER_STEP);
    let state = r.to_state();
    let json = serde_json::to_string(&state).unwrap();
    assert!(json.contains("\"phase\":\"progressing\""), "{json}");
    let back: RolloutState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    let mut restored = Rollout::from_state(back, Instant::now(), 5000).unwrap();
    assert_eq!(restored.snapshot(), r.snapshot());
    // The step restarts at load: a full hold and fresh requests again.
    advance(HOLD / 2).await;
    assert_eq!(
        restored.tick(Instant::now(), 9000, &Verdict::Healthy, MIN_PER_STEP),
        None
    );
    advance(HOLD / 2).await;
    assert_eq!(
        restored.tick(Instant::now(), 5010, &Verdict::Healthy, MIN_PER_STEP),
        Some(Event::JudgeBlocked)
    );
}

#[test]
fn invalid_state_is_refused() {
    let now = Instant::now();
    let mut state = Rollout::new(now).to_state();
    state.canary_weight_bp = 20_000;
    assert!(Rollout::from_state(state.clone(), now, 0).is_err());
    state.canary_weight_bp = 500;
    state.phase = Phase::RolledBack;
    state.latched = true;
    assert!(Rollout::from_state(state.clone(), now, 0)
        .unwrap_err()
        .to_string()
        .starts_with("saved rollout state is invalid: phase rolled_back"));
    state.canary_weight_bp = 0;
    state.step = 4;
    assert!(Rollout::from_state(state, now, 0).is_err());
}

#[test]
fn history_is_bounded() {
    let mut r = Rollout::new(Instant::now());
    for i in 0..(HISTORY_LIMIT + 5) {
        r.set_weight((i % 100) as f64, Actor::Api).unwrap();
    }
    assert_eq!(r.history().len(), HISTORY_LIMIT);
    assert_eq!(r.history().front().unwrap().to, 5.0);
}

#[test]
fn names_are_snake_case() {
    let json =
        serde_json::to_string(&(Phase::RolledBack, Actor::Startup, Event::JudgeBlocked)).unwrap();
    assert_eq!(json, r#"["rolled_back","startup","judge_blocked"]"#);
    assert_eq!(Phase::RolledBack.as_str(), "rolled_back");
    assert_eq!(Event::JudgeBlocked.to_string(), "judge_blocked");
}

#[test]
fn rfc3339_formats_utc() {
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    let t = UNIX_EPOCH + Duration::from_millis(1_795_408_800_123);
    assert_eq!(rfc3339(t), "2026-11-23T04:40:00.123Z");
    let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
    assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
}

#[test]
fn holds_parse_as_users_write_them() {
    assert_eq!(parse_hold("60s"), Ok(Duration::from_secs(60)));
    assert_eq!(parse_hold("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_hold("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_hold("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_hold("1h"), Ok(Duration::from_secs(3600)));
    for bad in ["", "60", "s", "1.5s", "10 s", "-1s", "1d"] {
        assert!(parse_hold(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        parse_hold("60").unwrap_err().to_string(),
        "hold must be a duration like 60s, 5m, 1m30s or 500ms (got \"60\")"
    );
}

// === shadowing ===

/// A rollout with a shadow step of `hold` at 100%, started at `canary`
/// cumulative requests.
fn started_shadowed(canary: u64, hold: Duration) -> Rollout {
    let mut r = Rollout::new(Instant::now());
    let event = r
        .start_rollout_with_shadow(
            &crate::defaults::ROLLOUT_STEPS,
            HOLD,
            Some((hold, 100.0)),
            Instant::now(),
            canary,
        )
        .unwrap();
    assert_eq!(event, Some(Event::Shadowing));
    r
}

#[tokio::test(start_paused = true)]
async fn a_shadow_step_sends_no_user_then_advances_to_the_first_weight_step() {
    let shadow = Duration::from_secs(30);
    let mut r = started_shadowed(0, shadow);
    assert_eq!(
        (r.phase(), r.canary_weight_bp(), r.shadow_bp()),
        (Phase::Shadowing, 0, 10_000)
    );
    assert_eq!(r.shadow_hold(), Some(shadow));
    advance(shadow - Duration::from_millis(1)).await;
    assert_eq!(
        r.tick(Instant::now(), 1000, &Verdict::Healthy, MIN_PER_STEP),
        None,
        "the shadow's own hold, not the steps'"
    );
    advance(Duration::from_millis(1)).await;
    // Too few copies since the shadow began: it holds, as any step.
    assert_eq!(
        r.tick(
            Instant::now(),
            MIN_PER_STEP - 1,
            &Verdict::Healthy,
            MIN_PER_STEP
        ),
        Some(Event::JudgeBlocked)
    );
    assert!(
        r.reason().starts_with("holding the shadow (100%)"),
        "{}",
        r.reason()
    );
    assert_eq!(r.phase(), Phase::Shadowing);
    assert_eq!(
        r.tick(Instant::now(), MIN_PER_STEP, &insufficient(), MIN_PER_STEP),
        None,
        "no verdict yet: holds (the blocked event was sent once)"
    );
    assert_eq!(
        r.tick(
            Instant::now(),
            MIN_PER_STEP,
            &Verdict::Healthy,
            MIN_PER_STEP
        ),
        Some(Event::Step)
    );
    assert_eq!(
        (r.phase(), r.canary_weight_bp(), r.shadow_bp()),
        (Phase::Progressing, 500, 0)
    );
    assert_eq!(r.shadow_hold(), None);
    assert_eq!(r.snapshot().step, 1);
    assert!(
        r.reason().contains("the shadow healthy over 30s"),
        "{}",
        r.reason()
    );
    // The first weight step holds for the rollout's own hold from now on.
    advance(HOLD - Duration::from_millis(1)).await;
    assert_eq!(
        r.tick(
            Instant::now(),
            10 * MIN_PER_STEP,
            &Verdict::Healthy,
            MIN_PER_STEP
        ),
        None
    );
}

#[tokio::test(start_paused = true)]
async fn a_shadow_breach_rolls_back_before_any_user_reaches_the_canary() {
    let mut r = started_shadowed(0, Duration::from_secs(30));
    assert_eq!(
        r.tick(Instant::now(), 100, &breach(), MIN_PER_STEP),
        Some(Event::Rollback)
    );
    assert_eq!((r.phase(), r.canary_weight_bp()), (Phase::RolledBack, 0));
    assert!(r.latched());
    assert_eq!(r.shadow_bp(), 0, "no copies while rolled back");
    assert_eq!(
        r.reason(),
        "shadow: canary error rate 31.0% > 5.0% over 412 requests (window 10s)"
    );
    // Resume goes back to the shadow step, not to a weight.
    assert_eq!(
        r.resume(Instant::now(), 100, Actor::Api).unwrap(),
        Some(Event::Shadowing)
    );
    assert_eq!(
        (r.phase(), r.canary_weight_bp(), r.shadow_bp()),
        (Phase::Shadowing, 0, 10_000)
    );
    assert_eq!(r.shadow_hold(), Some(Duration::from_secs(30)));
}

#[tokio::test(start_paused = true)]
async fn a_shadow_by_hand_lasts_until_changed_and_survives_a_restart() {
    let mut r = Rollout::new(Instant::now());
    assert_eq!(
        r.start_shadow(25.0, Actor::Api, Instant::now(), 0).unwrap(),
        Some(Event::Shadowing)
    );
    assert_eq!(
        (r.phase(), r.shadow_bp(), r.shadow_hold()),
        (Phase::Shadowing, 2500, None)
    );
    advance(Duration::from_secs(3600)).await;
    assert_eq!(
        r.tick(Instant::now(), 10_000, &Verdict::Healthy, MIN_PER_STEP),
        None,
        "a shadow by hand never advances by itself"
    );
    assert_eq!(
        r.pause(Actor::Api),
        Err(RolloutError::NotProgressing {
            phase: Phase::Shadowing
        })
    );
    let restored = Rollout::from_state(r.to_state(), Instant::now(), 0).unwrap();
    assert_eq!(
        (
            restored.phase(),
            restored.shadow_bp(),
            restored.canary_weight_bp()
        ),
        (Phase::Shadowing, 2500, 0)
    );
    // Leaving it: a weight (or promote, rollback, rollout).
    r.set_weight(5.0, Actor::Api).unwrap();
    assert_eq!((r.phase(), r.shadow_bp()), (Phase::Manual, 0));
}

#[test]
fn shadow_percent_and_saved_shadows_are_checked() {
    let mut r = Rollout::new(Instant::now());
    for bad in [0.0, -1.0, 100.5, f64::NAN] {
        let e = r
            .start_shadow(bad, Actor::Api, Instant::now(), 0)
            .unwrap_err();
        assert!(
            matches!(e, RolloutError::InvalidShadowPercent { .. }),
            "{bad}: {e}"
        );
        assert!(e.to_string().contains("write 100"), "{e}");
    }
    assert_eq!(r.phase(), Phase::Steady, "nothing changed");
    r.start_shadow(100.0, Actor::Api, Instant::now(), 0)
        .unwrap();
    let mut state = r.to_state();
    state.canary_weight_bp = 100;
    assert!(Rollout::from_state(state, Instant::now(), 0).is_err());
    let mut state = r.to_state();
    state.shadow_bp = 0;
    assert!(Rollout::from_state(state, Instant::now(), 0).is_err());
    // A state saved before shadowing existed has neither field.
    let mut old = serde_json::to_value(Rollout::new(Instant::now()).to_state()).unwrap();
    let fields = old.as_object_mut().unwrap();
    fields.remove("shadow_bp");
    fields.remove("shadow_hold_ms");
    let old: RolloutState = serde_json::from_value(old).unwrap();
    assert_eq!((old.shadow_bp, old.shadow_hold_ms), (0, None));
}
