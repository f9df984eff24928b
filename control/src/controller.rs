//! The controller: the glue between the data plane's [`Routes`] and
//! [`Stats`], the [`Judge`], the [`Rollout`] state machine, the
//! [`StateStore`] and the event sink.
//!
//! It exists so that the API, the CLI, metrics and webhooks all drive one
//! object, and so that every change follows the same order: change the
//! rollout, swap the route table (one store), persist, then notify. The
//! judge loop swaps routes before it persists, so a revert takes effect
//! within one tick of the breach being visible.
//!
//! After an explicit change (weight, rollout, resume, ...) a run of canary
//! errors counts only requests since the change, so the run that caused a
//! revert cannot revert the canary again at once. Whenever the canary's
//! course changes (its weight, the latch, the phase; by the API, the fleet
//! or the judge's own step), the judge re-arms with fresh evidence, so the
//! canary is judged on what it does from then on. When a change lifts the
//! rollback latch, both upstreams' windows restart too, so `/status` shows
//! the canary's new life and the windows still cover the same time. While
//! latched, the route table is closed: override headers and cookies cannot
//! reach the canary either.
//!
//! It never blocks the data plane: the request path only sees a new route
//! table; persistence runs on the blocking pool; events are `try_send`,
//! dropped (and logged) if the sink is full.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serin_proxy::{OutcomeCursor, RouteTable, Routes, Stats, Target, WindowSnapshot};
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;

use crate::defaults;
use crate::judge::{Evidence, Judge, JudgePolicy, Look, PolicyError, Secs, Verdict};
use crate::rollout::{
    percent, rfc3339, Actor, Event, Phase, Rollout, RolloutError, RolloutSnapshot, Transition,
};
use crate::store::{PersistedState, StateStore, StoreError};

// === impl ControllerConfig ===

/// How the controller runs. Every field has a default.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// The judge's policy. Default [`JudgePolicy::default`]. The [`Stats`]
    /// given to the controller should use the same window.
    pub policy: JudgePolicy,
    /// How often the judge loop looks at the windows. Default
    /// [`defaults::JUDGE_INTERVAL`].
    pub interval: Duration,
    /// The loop evaluates only when a request completed since its last
    /// look, or when this long has passed (windows age and holds elapse
    /// without traffic). Default 1 s.
    pub idle_interval: Duration,
    /// Canary requests a rollout step must serve before it may advance.
    /// Default [`defaults::MIN_REQUESTS_PER_STEP`].
    pub min_requests_per_step: u64,
    /// Steps of a rollout started without any, in percent. Default
    /// [`defaults::ROLLOUT_STEPS`].
    pub default_steps: Vec<f64>,
    /// Hold of a rollout started without one. Default
    /// [`defaults::ROLLOUT_HOLD`].
    pub default_hold: Duration,
    /// The shadow step of a rollout started without saying (`rollout.shadow`):
    /// its hold, or none for no shadow step. Default none.
    pub default_shadow_hold: Option<Duration>,
    /// Share of stable's eligible requests copied to the canary when
    /// shadowing, in percent, when a call names none (`shadow.percent`).
    /// Default [`defaults::SHADOW_PERCENT`].
    pub default_shadow_percent: f64,
    /// Canary weight, in percent, when there is no saved state (a corrupt
    /// one always starts at 0). Default [`defaults::CANARY_WEIGHT`].
    pub initial_weight: f64,
    /// The stable upstream's URL, as shown in `/status`. Default empty.
    pub stable_url: String,
    /// The canary upstream's URL, as shown in `/status`. Default empty.
    pub canary_url: String,
    /// A fleet member (`serin run --fleet`): start closed and ignore the
    /// saved state until the fleet's rollout is adopted
    /// ([`Controller::adopt_fleet`]), and leave the steps to the fleet's
    /// leader; the local judge still reverts at once. Default false.
    pub fleet_member: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            policy: JudgePolicy::default(),
            interval: defaults::JUDGE_INTERVAL,
            idle_interval: Duration::from_secs(1),
            min_requests_per_step: defaults::MIN_REQUESTS_PER_STEP,
            default_steps: defaults::ROLLOUT_STEPS.to_vec(),
            default_hold: defaults::ROLLOUT_HOLD,
            default_shadow_hold: None,
            default_shadow_percent: defaults::SHADOW_PERCENT,
            initial_weight: defaults::CANARY_WEIGHT,
            stable_url: String::new(),
            canary_url: String::new(),
            fleet_member: false,
        }
    }
}

/// Why a controller call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The judge policy is invalid (at start).
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The request was refused; nothing changed. (An API answers 400/409.)
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    /// The change **is in effect** (routes were swapped) but could not be
    /// saved, so it would not survive a restart.
    #[error("the change is in effect but was not saved: {0}")]
    Store(#[from] StoreError),
}

// === Status ===

/// One upstream over the judge's current window (`/status`, webhooks).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// The upstream's URL.
    pub url: String,
    /// Requests completed in the window.
    pub requests: u64,
    /// Of those, errors.
    pub errors: u64,
    /// `errors / requests`, 0 when idle.
    pub error_rate: f64,
    /// Median latency to response headers, ms.
    pub p50_ms: f64,
    /// 95th percentile latency, ms.
    pub p95_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Each endpoint (address) of the upstream, since start; `/status`
    /// only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointStatus>,
}

/// One endpoint of an upstream in `/status`: its counts since start, and
/// whether outlier detection has it out of rotation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// `ip:port`.
    pub address: String,
    /// `serving`, or `ejected`.
    pub state: String,
    /// Answers from it, and failures to connect to it.
    pub requests: u64,
    /// Of those, 5xx answers and failures to connect.
    pub failures: u64,
    /// Times outlier detection ejected it.
    pub ejections: u32,
}

impl EndpointStatus {
    fn list(stats: &Stats, target: Target) -> Vec<Self> {
        let Some(set) = stats.endpoints(target) else {
            return Vec::new();
        };
        set.snapshot()
            .into_iter()
            .map(|e| Self {
                address: e.address,
                state: if e.ejected { "ejected" } else { "serving" }.into(),
                requests: e.requests,
                failures: e.failures,
                ejections: e.ejections,
            })
            .collect()
    }
}

impl UpstreamStatus {
    /// Summarises a window snapshot.
    pub fn new(url: &str, window: &WindowSnapshot) -> Self {
        let ms = |q| window.quantile(q).as_secs_f64() * 1000.0;
        Self {
            url: url.to_string(),
            requests: window.requests,
            errors: window.errors,
            error_rate: window.error_rate(),
            p50_ms: ms(0.5),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            endpoints: Vec::new(),
        }
    }
}

/// Both upstreams over the judge's current window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Upstreams {
    /// The stable upstream.
    pub stable: UpstreamStatus,
    /// The canary upstream.
    pub canary: UpstreamStatus,
}

/// The shadow (phase `shadowing`) in `/status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowStatus {
    /// Share of stable's eligible requests copied to the canary now, in
    /// percent (0 outside `shadowing`).
    pub percent: f64,
    /// The hold of a rollout's shadow step, e.g. `60s`, while it is current.
    pub hold: Option<String>,
    /// Copies sent to the canary since serin started.
    pub requests: u64,
    /// Requests picked for a copy but not copied since serin started (over
    /// the concurrency bound, a body, a method).
    pub skipped: u64,
    /// Pairs (stable's answer and the copy's) compared in the judge's
    /// current window.
    pub compared: u64,
    /// Of those, pairs whose status classes differed.
    pub mismatches: u64,
    /// `mismatches / compared`, 0 when none were compared.
    pub mismatch_rate: f64,
}

/// The body of `GET /status`: phase, `canary_weight` (percent), `step`
/// (from 1; 0 outside a rollout), `steps`, `hold`, `latched`, `reason`,
/// `upstreams.{stable,canary}` over the current window, and `shadow`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The rollout's state.
    #[serde(flatten)]
    pub rollout: RolloutSnapshot,
    /// Both upstreams over the current window.
    pub upstreams: Upstreams,
    /// The shadow's figures.
    #[serde(default)]
    pub shadow: ShadowStatus,
}

/// What the event sink receives: enough for a webhook body
/// (`{id, event, at, canary_weight, phase, reason, upstreams}`; the sender
/// adds the id) and for counting rollbacks by actor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// What happened.
    pub event: Event,
    /// When, RFC 3339 UTC.
    pub at: String,
    /// The canary weight after it, in percent.
    pub canary_weight: f64,
    /// The phase after it.
    pub phase: Phase,
    /// Why.
    pub reason: String,
    /// Who caused it.
    pub actor: Actor,
    /// Both windows as the judge (or the API call) saw them.
    pub upstreams: Upstreams,
}

/// What a fleet member's controller knows of its fleet.
#[derive(Default)]
struct FleetView {
    epoch: AtomicU64,
    adopted: std::sync::atomic::AtomicBool,
}

/// What [`Controller::adopt_fleet`] did with the fleet's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adopted {
    /// The member now runs the fleet's rollout.
    Applied,
    /// Nothing but the reason differed.
    Unchanged,
    /// The member rolled back in this epoch and the fleet has not heard yet:
    /// the local rollback stands, and must be written to the fleet.
    KeptLocalRollback,
    /// The fleet's epoch is older than the one the member runs; ignored.
    Stale,
}

/// A fleet member's local rollout, as [`Controller::fleet_view`] reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberView {
    /// The fleet epoch the member runs.
    pub epoch: u64,
    /// Whether it has adopted the fleet's state yet.
    pub adopted: bool,
    /// Its rollout, in the persisted form (without history).
    pub state: crate::rollout::RolloutState,
}

// === impl Controller ===

/// The control plane's handle. Cheap to clone; the judge loop stops when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

struct Inner {
    rollout: Mutex<Rollout>,
    routes: Routes,
    stats: Stats,
    /// Swapped whole when a fleet's spec changes the policy.
    judge: std::sync::Mutex<Arc<Judge>>,
    store: StateStore,
    events: Option<mpsc::Sender<Notification>>,
    config: ControllerConfig,
    rollbacks: [AtomicU64; 4],
    evaluations: AtomicU64,
    /// Wakeups of the judge loop (see [`Controller::looks`]).
    looks: AtomicU64,
    /// The rollout's phase, as an index into [`Phase::ALL`], for readers
    /// that cannot wait for the rollout lock (metrics). Set with the routes.
    phase: std::sync::atomic::AtomicUsize,
    /// A fleet member's view of its fleet: the epoch of the rollout it runs,
    /// and whether it has adopted one yet (until then the routes stay
    /// closed). Changed only under the `rollout` lock.
    fleet: FleetView,
    /// Bumped after every change of the rollout, for whoever must follow it
    /// (a fleet member publishes its local rollbacks).
    changes: tokio::sync::watch::Sender<u64>,
    /// Cumulative canary requests at the last API change. A run of canary
    /// errors counts only the requests since then, so the run that caused a
    /// revert cannot revert the canary again the moment an operator brings
    /// it back: after a revert the canary gets no traffic, so its run would
    /// otherwise never end.
    runs_counted_from: AtomicU64,
    /// The judge's evidence since the last arm, and how far it has read.
    /// Locked by the judge loop and by re-arms, never across an await.
    judging: std::sync::Mutex<Judging>,
}

/// What the judge loop carries from one look to the next.
struct Judging {
    evidence: Evidence,
    /// Re-arms so far: a verdict reached before a re-arm is not applied
    /// after it.
    arms: u64,
    /// Where [`Stats::new_outcomes`] is up to, per [`Target::index`].
    cursors: [OutcomeCursor; 2],
    last_look: Instant,
}

/// What a re-arm is about: the canary's weight, the latch, and whether it
/// is shadowed (its traffic is copies). A pause or a resume at the same
/// weight keeps the evidence.
fn course(rollout: &Rollout) -> (u16, bool, bool) {
    (
        rollout.canary_weight_bp(),
        rollout.latched(),
        rollout.phase() == Phase::Shadowing,
    )
}

impl Controller {
    /// Loads the saved state, applies its weight to `routes`, records a
    /// `startup` transition, saves, and spawns the judge loop.
    ///
    /// A saved state that cannot be read, parsed or trusted is moved aside
    /// and the canary starts at 0 (logged with `tracing::error!`); a save
    /// that fails is logged too. Neither stops the service. Only an invalid
    /// policy or initial weight is an error.
    ///
    /// Must be called inside a tokio runtime: the control plane's, not a
    /// data-plane worker's, since the judge loop is spawned on it.
    pub async fn start(
        config: ControllerConfig,
        routes: Routes,
        stats: Stats,
        store: StateStore,
        events: Option<mpsc::Sender<Notification>>,
    ) -> Result<Self, ControllerError> {
        let judge = Judge::new(config.policy.clone())?;
        if stats.window() != config.policy.window {
            tracing::warn!(
                stats_window = ?stats.window(),
                judge_window = ?config.policy.window,
                "the stats window differs from the judge's; reasons will quote the judge's"
            );
        }
        let now = Instant::now();
        let canary_total = stats.request_count(Target::Canary);
        let rollout = if config.fleet_member {
            // Closed until the fleet's state is read: a rolled-back fleet
            // must stay at 0 on a new pod, whatever its disk says.
            let mut rollout = Rollout::new(now);
            rollout.record_startup(
                0,
                "fleet member: closed until the fleet's rollout is read".into(),
            );
            rollout
        } else {
            load_rollout(&store, &config, now, canary_total).await?
        };
        let judging = Judging {
            evidence: judge.arm(),
            arms: 0,
            cursors: Default::default(),
            last_look: now,
        };
        let inner = Arc::new(Inner {
            rollout: Mutex::new(rollout),
            routes,
            stats,
            judge: std::sync::Mutex::new(Arc::new(judge)),
            judging: std::sync::Mutex::new(judging),
            store,
            events,
            config,
            rollbacks: Default::default(),
            evaluations: AtomicU64::new(0),
            looks: AtomicU64::new(0),
            phase: Default::default(),
            fleet: FleetView::default(),
            changes: tokio::sync::watch::channel(0).0,
            runs_counted_from: AtomicU64::new(canary_total),
        });
        {
            let rollout = inner.rollout.lock().await;
            inner.apply_routes(&rollout);
            if let Err(e) = inner.persist(&rollout).await {
                tracing::error!(error = %e, "could not save state at start-up");
            }
        }
        tokio::spawn(judge_loop(
            Arc::downgrade(&inner),
            inner.config.interval,
            inner.config.idle_interval,
        ));
        Ok(Self { inner })
    }

    /// The route table handle the controller writes.
    pub fn routes(&self) -> &Routes {
        &self.inner.routes
    }

    /// The stats handle the controller reads.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ControllerConfig {
        &self.inner.config
    }

    /// Rollbacks so far (since this process started) caused by `actor`.
    pub fn rollbacks_total(&self, actor: Actor) -> u64 {
        self.inner.rollbacks[actor_index(actor)].load(Relaxed)
    }

    /// The rollout's phase as of its last change.
    pub fn phase(&self) -> Phase {
        Phase::ALL[self.inner.phase.load(Relaxed)]
    }

    /// How many times the judge loop has evaluated the windows.
    pub fn evaluations(&self) -> u64 {
        self.inner.evaluations.load(Relaxed)
    }

    /// How many times the judge loop has woken to look at the request
    /// counts (most looks on an idle proxy evaluate nothing).
    pub fn looks(&self) -> u64 {
        self.inner.looks.load(Relaxed)
    }

    /// `GET /status`.
    pub async fn status(&self) -> Status {
        let rollout = self.inner.rollout.lock().await;
        let now = Instant::now();
        Status {
            rollout: rollout.snapshot(),
            upstreams: self.inner.upstreams(now),
            shadow: self.inner.shadow_status(&rollout, now),
        }
    }

    /// `GET /history`: recent transitions, oldest first.
    pub async fn history(&self) -> Vec<Transition> {
        self.inner
            .rollout
            .lock()
            .await
            .history()
            .iter()
            .cloned()
            .collect()
    }

    /// `PUT /weight`: sets the canary weight (percent) by hand.
    pub async fn set_weight(&self, pct: f64) -> Result<Status, ControllerError> {
        self.inner
            .apply(|r, _, _| r.set_weight(pct, Actor::Api))
            .await
    }

    /// `POST /rollout`: starts a rollout; `None` takes the configured
    /// default steps, hold or shadow step (`rollout.shadow`; none unless
    /// configured).
    pub async fn rollout(
        &self,
        steps: Option<Vec<f64>>,
        hold: Option<Duration>,
        shadow: Option<Duration>,
    ) -> Result<Status, ControllerError> {
        let config = &self.inner.config;
        let steps = steps.unwrap_or_else(|| config.default_steps.clone());
        let hold = hold.unwrap_or(config.default_hold);
        let shadow = shadow
            .or(config.default_shadow_hold)
            .map(|hold| (hold, config.default_shadow_percent));
        self.inner
            .apply(|r, now, canary| r.start_rollout_with_shadow(&steps, hold, shadow, now, canary))
            .await
    }

    /// `POST /shadow`: phase `shadowing`, copying `percent` (default
    /// `shadow.percent`) of stable's eligible requests to the canary.
    pub async fn shadow(&self, percent: Option<f64>) -> Result<Status, ControllerError> {
        let pct = percent.unwrap_or(self.inner.config.default_shadow_percent);
        self.inner
            .apply(|r, now, canary| r.start_shadow(pct, Actor::Api, now, canary))
            .await
    }

    /// `POST /pause`.
    pub async fn pause(&self) -> Result<Status, ControllerError> {
        self.inner.apply(|r, _, _| r.pause(Actor::Api)).await
    }

    /// `POST /resume`.
    pub async fn resume(&self) -> Result<Status, ControllerError> {
        self.inner
            .apply(|r, now, canary| r.resume(now, canary, Actor::Api))
            .await
    }

    /// `POST /promote`.
    pub async fn promote(&self) -> Result<Status, ControllerError> {
        self.inner.apply(|r, _, _| r.promote(Actor::Api)).await
    }

    /// `POST /rollback`: canary to 0, latched.
    pub async fn rollback(&self) -> Result<Status, ControllerError> {
        self.inner
            .apply(|r, _, _| Ok(r.rollback(Actor::Api, "rolled back by api".to_string())))
            .await
    }

    /// The judge's policy now.
    pub fn policy(&self) -> JudgePolicy {
        self.inner.judge.lock().expect("judge").policy().clone()
    }

    /// Judges with `policy` from the next look on (a fleet's `spec.judge`).
    /// The window cannot change while serving: the data plane's windows
    /// keep the one they started with, and the policy keeps it too.
    pub fn set_policy(&self, mut policy: JudgePolicy) -> Result<(), PolicyError> {
        let window = self.inner.stats.window();
        if policy.window != window {
            tracing::warn!(wanted = ?policy.window, kept = ?window,
                "the judge's window is fixed at start; keeping this serin's");
            policy.window = window;
        }
        let judge = Judge::new(policy)?;
        let mut current = self.inner.judge.lock().expect("judge");
        if current.policy() != judge.policy() {
            tracing::info!(policy = ?judge.policy(), "judge policy changed");
            *current = Arc::new(judge);
            drop(current);
            self.inner.rearm();
        }
        Ok(())
    }

    /// Follows every change of the rollout: the value is bumped after each
    /// one (routes already swapped).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// A fleet member's local rollout and the fleet epoch it belongs to.
    pub async fn fleet_view(&self) -> MemberView {
        let rollout = self.inner.rollout.lock().await;
        let mut state = rollout.to_state();
        state.history.clear();
        MemberView {
            epoch: self.inner.fleet.epoch.load(Relaxed),
            adopted: self.inner.fleet.adopted.load(Relaxed),
            state,
        }
    }

    /// Applies the fleet's rollout (`state`, of fleet `epoch`) to this
    /// member, unless that would undo what the member knows better:
    /// - an older epoch is ignored ([`Adopted::Stale`]);
    /// - in the same epoch, a local rollback stands against a fleet that has
    ///   not recorded it yet ([`Adopted::KeptLocalRollback`]): a rollback is
    ///   undone only by an explicit raise, which starts a new epoch.
    ///
    /// The check and the change happen under one lock, so a breach the local
    /// judge finds meanwhile is never overwritten.
    ///
    /// With `notify`, the change is announced as an event (webhooks, logs),
    /// as if this member had made it: the fleet's leader does so, so that a
    /// fleet's transitions fire once, not once per member.
    pub async fn adopt_fleet(
        &self,
        state: crate::rollout::RolloutState,
        epoch: u64,
        notify: bool,
    ) -> Result<Adopted, ControllerError> {
        let inner = &self.inner;
        let now = Instant::now();
        let canary_total = inner.stats.request_count(Target::Canary);
        let mut rollout = inner.rollout.lock().await;
        let local_epoch = inner.fleet.epoch.load(Relaxed);
        let adopted = inner.fleet.adopted.load(Relaxed);
        if adopted && epoch < local_epoch {
            return Ok(Adopted::Stale);
        }
        if adopted && epoch == local_epoch && rollout.latched() && !state.latched {
            return Ok(Adopted::KeptLocalRollback);
        }
        let current = rollout.to_state();
        let same_course = adopted
            && current.phase == state.phase
            && current.canary_weight_bp == state.canary_weight_bp
            && current.step == state.step
            && current.steps == state.steps
            && current.hold_ms == state.hold_ms
            && current.latched == state.latched
            && current.resume == state.resume
            && current.shadow_bp == state.shadow_bp
            && current.shadow_hold_ms == state.shadow_hold_ms;
        if same_course {
            // A new epoch that changes nothing here (the same weight set
            // again) is still this member's epoch from now on: a rollback it
            // decides must be recorded in it.
            inner.fleet.epoch.store(epoch, Relaxed);
            rollout.set_reason(state.reason);
            return Ok(Adopted::Unchanged);
        }
        let before = course(&rollout);
        let event = notify.then(|| fleet_event(&current, &state)).flatten();
        rollout.adopt(state, now, canary_total)?;
        inner.fleet.epoch.store(epoch, Relaxed);
        inner.fleet.adopted.store(true, Relaxed);
        if course(&rollout) != before {
            inner.runs_counted_from.store(canary_total, Relaxed);
            inner.rearm();
        }
        if before.1 && !rollout.latched() {
            inner.restart_windows(now);
        }
        let upstreams = inner.upstreams(now);
        let saved = inner.commit(&rollout, event, &upstreams).await;
        tracing::info!(epoch, phase = %rollout.phase(), canary_weight = percent(rollout.canary_weight_bp()),
            reason = %rollout.reason(), "applied the fleet's rollout");
        saved?;
        Ok(Adopted::Applied)
    }

    /// Closes the routes again (every request to stable, overrides
    /// included) until the fleet's rollout is next adopted: the fleet's
    /// object is gone, so nothing says the canary may have traffic.
    pub async fn close_for_fleet(&self, why: &str) {
        let inner = &self.inner;
        let mut rollout = inner.rollout.lock().await;
        inner.fleet.adopted.store(false, Relaxed);
        if rollout.canary_weight_bp() > 0 || !rollout.latched() {
            rollout.rollback(Actor::Fleet, format!("fleet: {why}"));
        }
        let upstreams = inner.upstreams(Instant::now());
        if let Err(e) = inner.commit(&rollout, None, &upstreams).await {
            tracing::error!(error = %e, "could not save the closed state");
        }
    }
}

/// The event a change from `before` to `after` (a fleet's rollout) is.
fn fleet_event(
    before: &crate::rollout::RolloutState,
    after: &crate::rollout::RolloutState,
) -> Option<Event> {
    match after.phase {
        Phase::RolledBack if before.phase != Phase::RolledBack => Some(Event::Rollback),
        Phase::Promoted if before.phase != Phase::Promoted => Some(Event::Promoted),
        Phase::Paused if before.phase != Phase::Paused => Some(Event::Paused),
        Phase::Shadowing if before.phase != Phase::Shadowing => Some(Event::Shadowing),
        Phase::Progressing if before.phase != Phase::Progressing || before.step != after.step => {
            Some(Event::Step)
        }
        _ => None,
    }
}

/// Builds the starting rollout from the store, on the safe side.
async fn load_rollout(
    store: &StateStore,
    config: &ControllerConfig,
    now: Instant,
    canary_total: u64,
) -> Result<Rollout, ControllerError> {
    let path = store.path();
    let loaded = {
        let store = store.clone();
        let path = path.clone();
        tokio::task::spawn_blocking(move || store.load())
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Read {
                    path,
                    source: std::io::Error::other(e),
                })
            })
    };
    let unusable = |cause: String| {
        tracing::error!(
            %cause,
            "saved state is unusable; starting with the canary at 0"
        );
        match store.quarantine() {
            Ok(aside) => {
                tracing::warn!(path = %aside.display(), "moved the unusable state file aside")
            }
            Err(e) => tracing::warn!(error = %e, "could not move the unusable state file aside"),
        }
        let mut rollout = Rollout::new(now);
        rollout.record_startup(0, format!("{cause}; starting with the canary at 0%"));
        rollout
    };
    let rollout = match loaded {
        Ok(Some(state)) => match Rollout::from_state(state.rollout, now, canary_total) {
            Ok(mut rollout) => {
                let w = rollout.canary_weight_bp();
                rollout.record_startup(
                    w,
                    format!(
                        "loaded {}: {} at {}%",
                        path.display(),
                        rollout.phase(),
                        percent(w)
                    ),
                );
                tracing::info!(phase = %rollout.phase(), canary_weight = percent(w), "state loaded");
                rollout
            }
            Err(e) => unusable(format!("state file {}: {e}", path.display())),
        },
        Ok(None) => {
            let mut rollout = Rollout::new(now);
            if config.initial_weight != 0.0 {
                rollout.set_weight(config.initial_weight, Actor::Startup)?;
            } else {
                rollout.record_startup(0, format!("no saved state in {}", store.dir().display()));
            }
            rollout
        }
        Err(e) => unusable(e.to_string()),
    };
    Ok(rollout)
}

fn actor_index(actor: Actor) -> usize {
    match actor {
        Actor::Judge => 0,
        Actor::Api => 1,
        Actor::Startup => 2,
        Actor::Fleet => 3,
    }
}

// === impl Inner ===

impl Inner {
    /// Runs one API operation: change, swap routes, persist, notify.
    async fn apply<F>(&self, op: F) -> Result<Status, ControllerError>
    where
        F: FnOnce(&mut Rollout, Instant, u64) -> Result<Option<Event>, RolloutError>,
    {
        let now = Instant::now();
        let canary_total = self.stats.request_count(Target::Canary);
        let mut rollout = self.rollout.lock().await;
        let was_latched = rollout.latched();
        let before = course(&rollout);
        let event = op(&mut rollout, now, canary_total)?;
        self.runs_counted_from.store(canary_total, Relaxed);
        if course(&rollout) != before {
            self.rearm();
        }
        if was_latched && !rollout.latched() {
            self.restart_windows(now);
        }
        let upstreams = self.upstreams(now);
        let saved = self.commit(&rollout, event, &upstreams).await;
        saved?;
        Ok(Status {
            rollout: rollout.snapshot(),
            upstreams,
            shadow: self.shadow_status(&rollout, now),
        })
    }

    /// Fresh evidence for the judge: the canary's course changed (or the
    /// policy did), so it is judged on what it does from now on.
    fn rearm(&self) {
        let evidence = self.judge.lock().expect("judge").arm();
        let mut judging = self.judging.lock().expect("judging");
        judging.evidence = evidence;
        judging.arms += 1;
    }

    /// The canary is back from a revert: `/status` and the shadow's check
    /// show what it does from now on, not the failures (or mismatches) that
    /// got it reverted. Both upstreams' windows restart, so they still
    /// cover the same time.
    fn restart_windows(&self, now: Instant) {
        self.stats.restart_window(Target::Stable, now);
        self.stats.restart_window(Target::Canary, now);
        self.stats.restart_shadow_window(now);
    }

    /// Feeds the outcomes since the last look to the judge, and applies its
    /// verdict.
    async fn judge_once(&self, now: Instant, canary_total: u64) {
        self.evaluations.fetch_add(1, Relaxed);
        let stable = self.stats.window_snapshot(Target::Stable, now);
        let canary = self.stats.window_snapshot(Target::Canary, now);
        let since_change = canary_total.saturating_sub(self.runs_counted_from.load(Relaxed));
        let canary_run = u64::from(self.stats.consecutive_errors(Target::Canary)).min(since_change);
        let judge = self.judge.lock().expect("judge").clone();
        // A shadowed canary's traffic is copies of some of stable's requests
        // (bodiless, idempotent ones): not stable's mix, so it is not
        // compared with stable's outcomes, only held to the limits and to
        // its pairs (below).
        let shadowed = Phase::ALL[self.phase.load(Relaxed)] == Phase::Shadowing;
        let nothing = WindowSnapshot::default();
        let (verdict, arm) = {
            let mut judging = self.judging.lock().expect("judging");
            let Judging {
                evidence,
                arms,
                cursors: [stable_cursor, canary_cursor],
                last_look,
            } = &mut *judging;
            let stable_new = self.stats.new_outcomes(Target::Stable, stable_cursor, now);
            let canary_new = self.stats.new_outcomes(Target::Canary, canary_cursor, now);
            let (stable_new, stable) = if shadowed {
                (&nothing, &nothing)
            } else {
                (&stable_new, &stable)
            };
            let look = Look {
                stable: stable_new,
                canary: &canary_new,
                stable_window: stable,
                canary_window: &canary,
                elapsed: now.saturating_duration_since(std::mem::replace(last_look, now)),
                stable_consecutive: self.stats.consecutive_errors(Target::Stable),
                canary_consecutive: canary_run as u32,
            };
            (judge.evaluate(evidence, &look), *arms)
        };
        let mut rollout = self.rollout.lock().await;
        if self.judging.lock().expect("judging").arms != arm {
            // Re-armed while this look waited for the rollout: its verdict
            // is about a course that no longer runs.
            return;
        }
        let before = course(&rollout);
        // A shadowed canary is judged on its copies' outcomes (in its
        // window like any canary request's), and on how often their status
        // class differs from stable's.
        let verdict = match verdict {
            Verdict::Breach { .. } => verdict,
            _ if rollout.phase() == Phase::Shadowing => judge
                .evaluate_shadow(&self.stats.shadow_window(now))
                .unwrap_or(verdict),
            _ => verdict,
        };
        let min_per_step = self.config.min_requests_per_step;
        let event = if self.config.fleet_member {
            rollout.guard(&verdict)
        } else {
            rollout.tick(now, canary_total, &verdict, min_per_step)
        };
        let Some(event) = event else {
            return;
        };
        if course(&rollout) != before {
            self.rearm();
        }
        let upstreams = Upstreams {
            stable: UpstreamStatus::new(&self.config.stable_url, &stable),
            canary: UpstreamStatus::new(&self.config.canary_url, &canary),
        };
        if let Err(e) = self.commit(&rollout, Some(event), &upstreams).await {
            tracing::error!(error = %e, event = %event, "judge transition not saved");
        }
    }

    /// After a change: swap routes, persist, notify. Routes first, so a
    /// revert does not wait for the disk.
    async fn commit(
        &self,
        rollout: &Rollout,
        event: Option<Event>,
        upstreams: &Upstreams,
    ) -> Result<(), StoreError> {
        self.apply_routes(rollout);
        self.changes.send_modify(|n| *n += 1);
        let saved = self.persist(rollout).await;
        if let Some(event) = event {
            self.notify(rollout, event, upstreams);
        }
        saved
    }

    fn apply_routes(&self, rollout: &Rollout) {
        let closed_for_fleet = self.config.fleet_member && !self.fleet.adopted.load(Relaxed);
        let table = if rollout.latched() || closed_for_fleet {
            RouteTable::closed()
        } else if rollout.phase() == Phase::Shadowing {
            RouteTable::shadowing(rollout.shadow_bp())
        } else {
            RouteTable::new(rollout.canary_weight_bp())
        };
        if **self.routes.load() != table {
            self.routes.store(table);
        }
        let phase = Phase::ALL.iter().position(|p| *p == rollout.phase());
        self.phase.store(phase.unwrap_or(0), Relaxed);
    }

    async fn persist(&self, rollout: &Rollout) -> Result<(), StoreError> {
        let state = PersistedState::new(rollout.to_state());
        let store = self.store.clone();
        let path = store.path();
        tokio::task::spawn_blocking(move || store.save(&state))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Write {
                    path,
                    source: std::io::Error::other(e),
                })
            })
    }

    fn notify(&self, rollout: &Rollout, event: Event, upstreams: &Upstreams) {
        let actor = rollout.history().back().map_or(Actor::Judge, |t| t.actor);
        let snapshot = rollout.snapshot();
        if event == Event::Rollback {
            self.rollbacks[actor_index(actor)].fetch_add(1, Relaxed);
            tracing::warn!(%actor, reason = %snapshot.reason, "canary rolled back");
        } else {
            tracing::info!(%event, %actor, phase = %snapshot.phase,
                canary_weight = snapshot.canary_weight, reason = %snapshot.reason, "rollout event");
        }
        let Some(events) = &self.events else { return };
        let notification = Notification {
            event,
            at: rfc3339(SystemTime::now()),
            canary_weight: snapshot.canary_weight,
            phase: snapshot.phase,
            reason: snapshot.reason,
            actor,
            upstreams: upstreams.clone(),
        };
        if let Err(e) = events.try_send(notification) {
            tracing::warn!(%event, error = %e, "event dropped: the sink is full or closed");
        }
    }

    fn shadow_status(&self, rollout: &Rollout, now: Instant) -> ShadowStatus {
        let totals = self.stats.shadow_totals();
        let pairs = self.stats.shadow_window(now);
        ShadowStatus {
            percent: percent(rollout.shadow_bp()),
            hold: rollout.shadow_hold().map(|h| Secs(h).to_string()),
            requests: totals.sent,
            skipped: totals.skipped.iter().sum(),
            compared: pairs.requests,
            mismatches: pairs.errors,
            mismatch_rate: pairs.error_rate(),
        }
    }

    fn upstreams(&self, now: Instant) -> Upstreams {
        let status = |url: &str, target| UpstreamStatus {
            endpoints: EndpointStatus::list(&self.stats, target),
            ..UpstreamStatus::new(url, &self.stats.window_snapshot(target, now))
        };
        Upstreams {
            stable: status(&self.config.stable_url, Target::Stable),
            canary: status(&self.config.canary_url, Target::Canary),
        }
    }
}

/// The longest the judge loop waits between looks while it backs off (unless
/// `interval` is longer): the first look after the canary gets requests
/// again comes at most this late.
const IDLE_LOOK_LIMIT: Duration = Duration::from_millis(100);

/// Looks every `interval`, and at once when the data plane reports a run of
/// errors; evaluates when a request completed since the last look, or after
/// `idle` without one.
///
/// While the route table sends the canary nothing by weight or shadow (no
/// rollout running, rolled back, an unadopted fleet member), no verdict can
/// revert anything, so each look that finds no new canary outcome doubles
/// the wait before the next, up to [`IDLE_LOOK_LIMIT`]; a request an
/// override header sends to the canary brings the full pace back. Such a
/// sidecar wakes about ten times a second rather than a hundred: each
/// wakeup of a parked thread costs tens of µs of kernel time on a VM, which
/// made these looks 1.3% of a core on an idle proxy. A canary with weight
/// or shadow share keeps the full pace whatever its traffic: one whose
/// requests stop completing may be hanging. Ends when the controller is
/// gone.
async fn judge_loop(inner: Weak<Inner>, interval: Duration, idle: Duration) {
    let longest_wait = interval.max(IDLE_LOOK_LIMIT);
    let mut wait = interval;
    let mut canary_seen = None;
    let mut last: Option<((u64, u64), Instant)> = None;
    let Some(stats) = inner.upgrade().map(|i| i.stats.clone()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stats.error_run_alarm().notified() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.looks.fetch_add(1, Relaxed);
        let now = Instant::now();
        let counts = (
            inner.stats.request_count(Target::Stable),
            inner.stats.request_count(Target::Canary),
        );
        let canary_routed = {
            let table = inner.routes.load();
            table.canary_weight_bp > 0 || table.shadow_bp > 0
        };
        wait = if !canary_routed && canary_seen == Some(counts.1) {
            (wait * 2).min(longest_wait)
        } else {
            interval
        };
        canary_seen = Some(counts.1);
        if let Some((seen, at)) = last {
            if seen == counts && now.saturating_duration_since(at) < idle {
                continue;
            }
        }
        last = Some((counts, now));
        inner.judge_once(now, counts.1).await;
    }
}

#[cfg(test)]
mod tests;
