use std::fs;
use std::time::Duration;

use serin_proxy::{RouteTable, Routes, Stats, Target};
use tokio::sync::mpsc;
use tokio::time::{advance, timeout, Instant};

use super::*;
use crate::store::StateStore;
use crate::test_support::TempDir;

const TICK: Duration = Duration::from_millis(10);

fn config() -> ControllerConfig {
    ControllerConfig {
        stable_url: "http://stable.test".into(),
        canary_url: "http://canary.test".into(),
        ..ControllerConfig::default()
    }
}

struct Running {
    controller: Controller,
    stats: Stats,
    events: mpsc::Receiver<Notification>,
}

async fn start(tmp: &TempDir, config: ControllerConfig, routes: Routes) -> Running {
    let stats = Stats::new(1, config.policy.window, Instant::now());
    let (tx, events) = mpsc::channel(64);
    let controller = Controller::start(
        config,
        routes,
        stats.clone(),
        StateStore::new(&tmp.0),
        Some(tx),
    )
    .await
    .unwrap();
    Running {
        controller,
        stats,
        events,
    }
}

/// Starts with `initial_weight` (percent) configured and the route table
/// at `routes_bp` before the controller applies the loaded state.
async fn start_at(tmp: &TempDir, initial_weight: f64, routes_bp: u16) -> Running {
    let config = ControllerConfig {
        initial_weight,
        ..config()
    };
    start(tmp, config, Routes::new(RouteTable::new(routes_bp))).await
}

fn feed(stats: &Stats, target: Target, n: u64, error: bool) {
    let now = Instant::now();
    for _ in 0..n {
        stats
            .worker(0)
            .upstream(target)
            .record(now, Duration::from_millis(20), error);
    }
}

/// Healthy traffic on both upstreams for `ticks` judge intervals.
async fn healthy_traffic(stats: &Stats, ticks: u32) {
    for _ in 0..ticks {
        feed(stats, Target::Stable, 9, false);
        feed(stats, Target::Canary, 1, false);
        tick().await;
    }
}

/// Moves the paused clock one judge interval and lets the loop run.
async fn tick() {
    advance(TICK).await;
    tokio::task::yield_now().await;
}

/// The next event, which must come within 100 ms of (paused) time.
async fn next_event(events: &mut mpsc::Receiver<Notification>) -> Notification {
    timeout(Duration::from_millis(100), events.recv())
        .await
        .expect("no event within 100 ms")
        .expect("event sink closed")
}

fn on_disk(tmp: &TempDir) -> crate::rollout::RolloutState {
    StateStore::new(&tmp.0).load().unwrap().unwrap().rollout
}

#[tokio::test(start_paused = true)]
async fn failing_canary_is_reverted_persisted_and_stays_reverted_after_restart() {
    let tmp = TempDir::new("controller-revert");
    let Running {
        controller,
        stats,
        mut events,
    } = start_at(&tmp, 0.0, 0).await;
    controller.set_weight(10.0).await.unwrap();
    assert_eq!(controller.routes().load().canary_weight_bp, 1000);

    healthy_traffic(&stats, 300).await;
    assert_eq!(controller.routes().load().canary_weight_bp, 1000);
    assert!(
        events.try_recv().is_err(),
        "a healthy canary raised an event"
    );

    // The canary starts failing every request.
    let broke = Instant::now();
    feed(&stats, Target::Canary, 12, true);
    let n = next_event(&mut events).await;
    assert!(Instant::now() - broke <= Duration::from_millis(50));
    assert_eq!(
        (n.event, n.actor, n.phase),
        (Event::Rollback, Actor::Judge, Phase::RolledBack)
    );
    assert_eq!(n.canary_weight, 0.0);
    assert_eq!(n.reason, "12 consecutive canary errors");
    assert_eq!(n.upstreams.canary.errors, 12);
    assert_eq!(n.upstreams.canary.url, "http://canary.test");
    assert_eq!(controller.routes().load().canary_weight_bp, 0);
    assert_eq!(controller.rollbacks_total(Actor::Judge), 1);

    let status = controller.status().await;
    assert_eq!(status.rollout.phase, Phase::RolledBack);
    assert_eq!(status.rollout.reason, "12 consecutive canary errors");
    let saved = on_disk(&tmp);
    assert_eq!(
        (saved.phase, saved.canary_weight_bp, saved.latched),
        (Phase::RolledBack, 0, true)
    );

    // Healthy verdicts do not undo the latch.
    for _ in 0..500 {
        feed(&stats, Target::Stable, 9, false);
        tick().await;
    }
    assert_eq!(controller.routes().load().canary_weight_bp, 0);

    // Once the old errors have left the window, an operator can bring the
    // canary back: the run of 12 errors that caused the revert still
    // stands (no canary request has succeeded since) but no longer counts.
    for _ in 0..1100 {
        feed(&stats, Target::Stable, 9, false);
        tick().await;
    }
    assert_eq!(stats.consecutive_errors(Target::Canary), 12);
    controller.set_weight(10.0).await.unwrap();
    for _ in 0..100 {
        feed(&stats, Target::Stable, 9, false);
        tick().await;
    }
    assert_eq!(controller.routes().load().canary_weight_bp, 1000);
    assert_eq!(controller.status().await.rollout.phase, Phase::Manual);
    // A new run after the change counts again.
    feed(&stats, Target::Canary, 10, true);
    assert_eq!(next_event(&mut events).await.event, Event::Rollback);
    assert_eq!(controller.routes().load().canary_weight_bp, 0);

    // A restart from the same directory keeps it at 0, whatever the
    // routes or the configured initial weight say.
    drop(controller);
    let restarted = start_at(&tmp, 50.0, 10_000).await;
    let c = &restarted.controller;
    assert_eq!(c.routes().load().canary_weight_bp, 0);
    let status = c.status().await;
    assert_eq!(status.rollout.phase, Phase::RolledBack);
    assert_eq!(status.rollout.reason, "10 consecutive canary errors");
    let history = c.history().await;
    let last = history.last().unwrap();
    assert_eq!(
        (last.actor, last.to, last.phase),
        (Actor::Startup, 0.0, Phase::RolledBack)
    );
    assert!(history
        .iter()
        .any(|t| t.actor == Actor::Judge && t.from == 10.0));
}

#[tokio::test(start_paused = true)]
async fn blast_radius_of_a_long_healthy_canary_that_breaks() {
    // 1,000 req/s, canary at 10%, split by the live route table. After a
    // minute of health the canary fails every request; count the failed
    // responses clients see before the revert.
    let tmp = TempDir::new("controller-blast");
    let Running {
        controller: c,
        stats,
        mut events,
    } = start_at(&tmp, 10.0, 0).await;
    let mut share = 0u64;
    let mut failed = 0;
    for t in 0..(60_000 + 5_000) / 10 {
        let broken = t >= 6_000;
        for _ in 0..10 {
            share += u64::from(c.routes().load().canary_weight_bp);
            if share >= 10_000 {
                share -= 10_000;
                feed(&stats, Target::Canary, 1, broken);
                failed += u64::from(broken);
            } else {
                feed(&stats, Target::Stable, 1, false);
            }
        }
        tick().await;
    }
    assert_eq!(c.routes().load().canary_weight_bp, 0);
    assert!(failed <= 30, "{failed} failed responses before the revert");
    let n = next_event(&mut events).await;
    assert_eq!((n.event, n.actor), (Event::Rollback, Actor::Judge));
}

#[tokio::test(start_paused = true)]
async fn corrupt_state_starts_at_zero_and_is_kept_aside() {
    let tmp = TempDir::new("controller-corrupt");
    fs::create_dir_all(&tmp.0).unwrap();
    fs::write(
        tmp.0.join("state.json"),
        "{\"version\": 1, \"rollout\": tru",
    )
    .unwrap();
    let running = start_at(&tmp, 20.0, 5000).await;
    let c = &running.controller;
    assert_eq!(c.routes().load().canary_weight_bp, 0);
    let status = c.status().await;
    assert_eq!(status.rollout.phase, Phase::Steady);
    assert!(
        status.rollout.reason.contains("is corrupt"),
        "{}",
        status.rollout.reason
    );
    assert!(status
        .rollout
        .reason
        .ends_with("starting with the canary at 0%"));
    // A fresh, valid state replaced it; the corrupt one was kept aside.
    assert_eq!(on_disk(&tmp).phase, Phase::Steady);
    let aside = fs::read_dir(&tmp.0)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("state.json.corrupt-")
        })
        .count();
    assert_eq!(aside, 1);
}

#[tokio::test(start_paused = true)]
async fn no_state_starts_at_the_initial_weight() {
    let tmp = TempDir::new("controller-initial");
    let running = start_at(&tmp, 12.5, 0).await;
    let c = &running.controller;
    assert_eq!(c.routes().load().canary_weight_bp, 1250);
    assert_eq!(c.status().await.rollout.phase, Phase::Manual);
    assert_eq!(c.history().await[0].actor, Actor::Startup);
    assert_eq!(on_disk(&tmp).canary_weight_bp, 1250);
}

#[tokio::test(start_paused = true)]
async fn api_calls_persist_before_returning_and_emit_events() {
    let tmp = TempDir::new("controller-api");
    let Running {
        controller: c,
        mut events,
        ..
    } = start_at(&tmp, 0.0, 0).await;

    let status = c
        .rollout(None, Some(Duration::from_secs(30)), None)
        .await
        .unwrap();
    assert_eq!(
        (status.rollout.phase, status.rollout.canary_weight),
        (Phase::Progressing, 5.0)
    );
    assert_eq!(
        (status.rollout.step, status.rollout.hold.as_str()),
        (1, "30s")
    );
    assert_eq!(on_disk(&tmp).phase, Phase::Progressing);
    assert_eq!(c.routes().load().canary_weight_bp, 500);
    assert_eq!(events.try_recv().unwrap().event, Event::Step);

    c.pause().await.unwrap();
    assert_eq!(on_disk(&tmp).phase, Phase::Paused);
    assert_eq!(events.try_recv().unwrap().event, Event::Paused);

    c.resume().await.unwrap();
    assert_eq!(on_disk(&tmp).phase, Phase::Progressing);

    c.promote().await.unwrap();
    assert_eq!(on_disk(&tmp).canary_weight_bp, 10_000);
    assert_eq!(c.routes().load().canary_weight_bp, 10_000);
    let events_seen: Vec<Event> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|n| n.event)
        .collect();
    assert_eq!(events_seen, [Event::Step, Event::Promoted]);

    let status = c.rollback().await.unwrap();
    assert_eq!(
        (status.rollout.phase, status.rollout.canary_weight),
        (Phase::RolledBack, 0.0)
    );
    assert_eq!(c.routes().load().canary_weight_bp, 0);
    let n = events.try_recv().unwrap();
    assert_eq!((n.event, n.actor), (Event::Rollback, Actor::Api));
    assert_eq!(c.rollbacks_total(Actor::Api), 1);
    assert_eq!(on_disk(&tmp).phase, Phase::RolledBack);

    let err = c.promote().await.unwrap_err();
    assert!(
        matches!(err, ControllerError::Rollout(RolloutError::Latched)),
        "{err}"
    );
    let err = c.set_weight(150.0).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("canary weight must be a percentage"),
        "{err}"
    );
    assert_eq!(
        c.routes().load().canary_weight_bp,
        0,
        "refused calls change nothing"
    );

    c.set_weight(1.0).await.unwrap();
    assert_eq!(c.routes().load().canary_weight_bp, 100);
    assert_eq!(on_disk(&tmp).phase, Phase::Manual);
}

#[tokio::test(start_paused = true)]
async fn the_loop_walks_a_rollout_to_promotion() {
    let tmp = TempDir::new("controller-walk");
    let Running {
        controller: c,
        stats,
        mut events,
    } = start(
        &tmp,
        ControllerConfig {
            min_requests_per_step: 30,
            ..config()
        },
        Routes::new(RouteTable::new(0)),
    )
    .await;
    c.rollout(Some(vec![50.0, 100.0]), Some(Duration::from_secs(1)), None)
        .await
        .unwrap();
    assert_eq!(next_event(&mut events).await.event, Event::Step);
    healthy_traffic(&stats, 110).await;
    let n = next_event(&mut events).await;
    assert_eq!(
        (n.event, n.actor, n.canary_weight),
        (Event::Step, Actor::Judge, 100.0)
    );
    healthy_traffic(&stats, 110).await;
    let n = next_event(&mut events).await;
    assert_eq!(
        (n.event, n.phase, n.canary_weight),
        (Event::Promoted, Phase::Promoted, 100.0)
    );
    assert_eq!(on_disk(&tmp).phase, Phase::Promoted);
}

#[tokio::test(start_paused = true)]
async fn a_step_without_traffic_holds_and_says_so_once() {
    let tmp = TempDir::new("controller-blocked");
    let Running {
        controller: c,
        mut events,
        ..
    } = start_at(&tmp, 0.0, 0).await;
    c.rollout(None, Some(Duration::from_secs(1)), None)
        .await
        .unwrap();
    assert_eq!(events.try_recv().unwrap().event, Event::Step);
    for _ in 0..500 {
        tick().await;
    }
    let n = next_event(&mut events).await;
    assert_eq!(n.event, Event::JudgeBlocked);
    assert_eq!(
        n.reason,
        "holding step 1 (5%): 0 of 50 canary requests since step start"
    );
    assert!(
        events.try_recv().is_err(),
        "judge_blocked is sent once per step"
    );
    let status = c.status().await;
    assert_eq!(
        (status.rollout.phase, status.rollout.canary_weight),
        (Phase::Progressing, 5.0)
    );
}

/// The judge loop's looks over 100 ticks in which stable serves
/// `stable_requests` a tick and the canary nothing.
async fn looks_in_100_ticks(c: &Controller, stats: &Stats, stable_requests: u64) -> u64 {
    let before = c.looks();
    for _ in 0..100 {
        feed(stats, Target::Stable, stable_requests, false);
        tick().await;
    }
    c.looks() - before
}

#[tokio::test(start_paused = true)]
async fn idle_windows_are_not_evaluated_every_tick_nor_looked_at() {
    let tmp = TempDir::new("controller-idle");
    let Running {
        controller: c,
        stats,
        ..
    } = start_at(&tmp, 0.0, 0).await;
    for _ in 0..500 {
        tick().await;
    }
    let idle = c.evaluations();
    assert!(
        (1..=7).contains(&idle),
        "{idle} evaluations in 5 idle seconds"
    );
    // Looks 10, 20, 40 and 80 ms apart, then every 100 ms: about 50 in 5 s
    // rather than one per tick.
    let idle_looks = c.looks();
    assert!(
        (45..=60).contains(&idle_looks),
        "{idle_looks} looks in 5 idle seconds"
    );
    // Stable's traffic alone (the canary at weight 0, between rollouts)
    // keeps the loop to a look per 100 ms.
    let stable_looks = looks_in_100_ticks(&c, &stats, 10).await;
    assert!(
        (9..=12).contains(&stable_looks),
        "{stable_looks} looks in 1 s of stable-only traffic"
    );
    // Requests an override header sends to the weight-0 canary bring back
    // one look, and one evaluation, per tick (the first look after the quiet
    // spell comes at most 100 ms late).
    let before = c.evaluations();
    healthy_traffic(&stats, 100).await;
    let busy = c.evaluations() - before;
    assert!(busy >= 90, "{busy} evaluations in 100 busy ticks");
    // A canary with a share of the traffic keeps the full pace whatever its
    // traffic: one whose requests stop completing may be hanging, with
    // stable busy or (at a share of 100%, or on a quiet proxy) not.
    c.shadow(Some(10.0)).await.unwrap();
    let shadowing = looks_in_100_ticks(&c, &stats, 0).await;
    assert!(shadowing >= 90, "{shadowing} looks in 100 ticks shadowing");
    c.set_weight(10.0).await.unwrap();
    let stable_busy = looks_in_100_ticks(&c, &stats, 10).await;
    assert!(
        stable_busy >= 90,
        "{stable_busy} looks in 100 ticks with a silent canary at 10%"
    );
    let all_quiet = looks_in_100_ticks(&c, &stats, 0).await;
    assert!(
        all_quiet >= 90,
        "{all_quiet} looks in 100 quiet ticks with the canary at 10%"
    );
}

#[tokio::test(start_paused = true)]
async fn status_has_the_documented_shape() {
    let tmp = TempDir::new("controller-status");
    let Running {
        controller: c,
        stats,
        ..
    } = start_at(&tmp, 0.0, 0).await;
    c.set_weight(12.5).await.unwrap();
    feed(&stats, Target::Canary, 3, true);
    feed(&stats, Target::Canary, 1, false);
    let json = serde_json::to_value(c.status().await).unwrap();
    assert_eq!(json["phase"], "manual");
    assert_eq!(json["canary_weight"], 12.5);
    assert_eq!(json["step"], 0);
    assert_eq!(json["steps"], serde_json::json!([5.0, 25.0, 50.0, 100.0]));
    assert_eq!(json["reason"], "canary weight set to 12.5% by api");
    let canary = &json["upstreams"]["canary"];
    assert_eq!(canary["url"], "http://canary.test");
    assert_eq!(
        (canary["requests"].as_u64(), canary["errors"].as_u64()),
        (Some(4), Some(3))
    );
    assert_eq!(canary["error_rate"], 0.75);
    for key in ["p50_ms", "p95_ms", "p99_ms"] {
        let ms = canary[key].as_f64().unwrap();
        assert!((ms - 20.0).abs() < 1.0, "{key} = {ms}");
    }
    let stable = &json["upstreams"]["stable"];
    assert_eq!(stable["url"], "http://stable.test");
    assert_eq!(stable["requests"], 0);
    assert_eq!(stable["p95_ms"], 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_full_event_sink_never_blocks() {
    let tmp = TempDir::new("controller-sink");
    let (tx, _events) = mpsc::channel(1);
    let c = Controller::start(
        config(),
        Routes::new(RouteTable::new(0)),
        Stats::new(1, Duration::from_secs(10), Instant::now()),
        StateStore::new(&tmp.0),
        Some(tx),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        c.rollout(None, None, None).await.unwrap();
        c.rollback().await.unwrap();
    }
    assert_eq!(c.rollbacks_total(Actor::Api), 3);
}

/// The error of a start that must fail.
async fn start_error(config: ControllerConfig) -> ControllerError {
    let tmp = TempDir::new("controller-refused");
    Controller::start(
        config,
        Routes::new(RouteTable::new(0)),
        Stats::new(1, Duration::from_secs(10), Instant::now()),
        StateStore::new(&tmp.0),
        None,
    )
    .await
    .err()
    .expect("start should have failed")
}

#[tokio::test(start_paused = true)]
async fn an_invalid_policy_or_initial_weight_is_refused_at_start() {
    let mut bad_policy = config();
    bad_policy.policy.max_error_rate = 5.0;
    let err = start_error(bad_policy).await;
    assert!(
        err.to_string().starts_with("`judge.max_error_rate`"),
        "{err}"
    );

    let bad_weight = ControllerConfig {
        initial_weight: -5.0,
        ..config()
    };
    let err = start_error(bad_weight).await;
    assert!(
        err.to_string()
            .starts_with("canary weight must be a percentage"),
        "{err}"
    );
}
