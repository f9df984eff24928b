//! What `serin run --fleet NAMESPACE/NAME` adds to a serin: membership of
//! the fleet that shares one `SerinRollout`.
//!
//! Four tasks, all on the control plane's runtime, none on the request path:
//! - **follow**: list the object, then watch it from that resourceVersion
//!   (bookmarks on; a 410 Gone lists again; errors reconnect with capped
//!   exponential backoff and jitter), and apply each version to the route
//!   table through [`Controller::adopt_fleet`]. Until the first read the
//!   routes stay closed; while the API is unreachable the member keeps its
//!   last state and its local judge, which can only lower the weight.
//! - **publish**: when the local judge rolls this member back, write the
//!   rollback to the fleet's status (epoch-checked, `resourceVersion`
//!   preconditioned), retrying until the API takes it or an operator has
//!   started a newer epoch.
//! - **report**: every `report_interval`, and at once after a new step,
//!   server-side apply this member's own key of the ConfigMap
//!   `serin-NAME-members`: its windows (counts and histogram buckets), step
//!   requests, and what it applied. Only the leader reads it, so a report
//!   reaches one reader, not every member.
//! - **lead**: hold the fleet's `coordination.k8s.io/v1` Lease (taken over
//!   when its holder stops renewing for the lease duration, judged by this
//!   member's own clock, as client-go does), and while holding it apply new
//!   spec generations, judge the aggregate of every fresh member's window,
//!   advance the steps, write the aggregate to `status.fleet`, and remove
//!   the reports of members long gone.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::Client;
use serde::Serialize;
use serde_json::json;
use serin_proxy::{Target, WindowSnapshot};
use tokio::sync::watch;
use tokio::time::Instant;

use super::crd::{
    FleetAggregate, MemberSummary, SerinRollout, SerinRolloutStatus, UpstreamAggregate,
    WindowSummary,
};
use super::ops::{is_conflict, Fleet, FleetError};
use super::state::{self, parse_time};
use super::FleetRef;
use crate::config::JudgeSettings;
use crate::controller::{Adopted, Controller};
use crate::judge::Judge;
use crate::rollout::{rfc3339, Phase};

/// How a member runs. [`MemberSettings::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct MemberSettings {
    /// The fleet's `SerinRollout`.
    pub target: FleetRef,
    /// This member's name in the fleet: its pod name.
    pub pod: String,
    /// How often it reports its windows. Default 10 s: about one API write
    /// per member per 10 s at steady state.
    pub report_interval: Duration,
    /// The Lease's duration: a leader that stops renewing for this long is
    /// replaced. Default 15 s (client-go's default); renewed every third.
    pub lease_duration: Duration,
    /// How often the leader looks at the aggregate. Default 1 s.
    pub leader_interval: Duration,
    /// The member's own judge configuration: the spec's `judge` keys
    /// override it.
    pub judge: JudgeSettings,
}

impl MemberSettings {
    /// The defaults for `target` and `pod`.
    pub fn new(target: FleetRef, pod: String, judge: JudgeSettings) -> Self {
        Self {
            target,
            pod,
            report_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(15),
            leader_interval: Duration::from_secs(1),
            judge,
        }
    }
}

/// What a member shows of its fleet (`/status` → `fleet`, metrics).
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct MemberStatus {
    /// `NAMESPACE/NAME`.
    pub name: String,
    /// This member's pod name.
    pub member: String,
    /// Whether its watch on the object is established.
    pub connected: bool,
    /// Whether it holds the fleet's Lease.
    pub leader: bool,
    /// The epoch it runs.
    pub epoch: u64,
    /// The spec generation of the object it last applied.
    pub generation: i64,
    /// Times it lost the API since it started.
    pub disconnects: u64,
}

/// A running member. Cheap to clone.
#[derive(Clone)]
pub struct Member {
    shared: Arc<Shared>,
}

struct Shared {
    fleet: Fleet,
    leases: Api<Lease>,
    controller: Controller,
    settings: MemberSettings,
    latest: watch::Sender<Option<Arc<SerinRollout>>>,
    connected: AtomicBool,
    leader: AtomicBool,
    disconnects: AtomicU64,
    generation: AtomicI64,
    /// `(epoch, step, canary requests when this member applied it)`.
    step_base: Mutex<(u64, u32, u64)>,
    /// The members' reports as the leader last read them, and when.
    reports: Mutex<(Option<Instant>, Vec<MemberSummary>)>,
    /// The aggregate the leader last wrote, and when.
    aggregate: Mutex<Option<(Instant, FleetAggregate)>>,
    /// Asks the reporter for a report now (a new step was applied).
    report_now: tokio::sync::Notify,
}

impl Member {
    /// Joins the fleet through `client` (found as kubectl would: in a pod,
    /// its service account) and starts the member's tasks. Returns at once:
    /// the routes stay closed until the object is read.
    pub fn with_client(client: Client, settings: MemberSettings, controller: Controller) -> Self {
        let fleet = Fleet::new(client.clone(), settings.target.clone());
        let leases = Api::namespaced(client, &settings.target.namespace);
        let shared = Arc::new(Shared {
            fleet,
            leases,
            controller,
            settings,
            latest: watch::channel(None).0,
            connected: AtomicBool::new(false),
            leader: AtomicBool::new(false),
            disconnects: AtomicU64::new(0),
            generation: AtomicI64::new(0),
            step_base: Mutex::new((0, 0, 0)),
            reports: Mutex::new((None, Vec::new())),
            aggregate: Mutex::new(None),
            report_now: tokio::sync::Notify::new(),
        });
        tokio::spawn(follow(shared.clone()));
        tokio::spawn(publish(shared.clone()));
        tokio::spawn(report(shared.clone()));
        tokio::spawn(lead(shared.clone()));
        Self { shared }
    }

    /// The fleet's object, for the operators' calls.
    pub fn fleet(&self) -> &Fleet {
        &self.shared.fleet
    }

    /// The actor this member's control API writes as: `api@POD`.
    pub fn api_actor(&self) -> String {
        format!("api@{}", self.shared.settings.pod)
    }

    /// What `/status` and the metrics show.
    pub async fn status(&self) -> MemberStatus {
        let s = &self.shared;
        MemberStatus {
            name: s.settings.target.to_string(),
            member: s.settings.pod.clone(),
            connected: s.connected.load(Relaxed),
            leader: s.leader.load(Relaxed),
            epoch: s.controller.fleet_view().await.epoch,
            generation: s.generation.load(Relaxed),
            disconnects: s.disconnects.load(Relaxed),
        }
    }

    /// The same, without waiting: for the metrics' synchronous render.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Relaxed)
    }

    /// Whether this member holds the fleet's Lease.
    pub fn is_leader(&self) -> bool {
        self.shared.leader.load(Relaxed)
    }

    /// Times the member lost the API since it started.
    pub fn disconnects(&self) -> u64 {
        self.shared.disconnects.load(Relaxed)
    }
}

// === follow ===

/// Capped exponential backoff with jitter: 100 ms doubling to 5 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    async fn wait(&mut self) {
        let jitter = 0.5 + jitter_unit();
        tokio::time::sleep(self.next.mul_f64(jitter)).await;
        self.next = (self.next * 2).min(Self::CAP);
    }
}

/// A number in [0, 1) that differs between members and calls, for jitter.
fn jitter_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64,
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

impl Shared {
    fn set_connected(&self, up: bool) {
        let was = self.connected.swap(up, Relaxed);
        if was && !up {
            self.disconnects.fetch_add(1, Relaxed);
            tracing::warn!(fleet = %self.settings.target,
                "lost the Kubernetes API; keeping the last state, judging locally, never raising");
        } else if !was && up {
            tracing::info!(fleet = %self.settings.target, "following the fleet's SerinRollout");
        }
    }

    /// Applies one version of the object.
    async fn apply(&self, object: SerinRollout) {
        let object = Arc::new(object);
        self.generation
            .store(object.metadata.generation.unwrap_or(0), Relaxed);
        if let Some(status) = object.status.as_ref().filter(|s| !s.phase.is_empty()) {
            match state::rollout_state(status, self.fleet.defaults()) {
                Ok(fleet_state) => match self
                    .controller
                    .adopt_fleet(fleet_state, status.epoch, self.leader.load(Relaxed))
                    .await
                {
                    Ok(Adopted::Applied) => self.note_step(status.epoch, status.step),
                    Ok(Adopted::KeptLocalRollback) => {
                        tracing::info!("keeping this member's rollback until the fleet records it")
                    }
                    Ok(Adopted::Stale) => tracing::warn!(
                        epoch = status.epoch,
                        "ignored a SerinRollout status from an older epoch"
                    ),
                    Ok(Adopted::Unchanged) => {}
                    Err(e) => tracing::error!(error = %e, "could not apply the fleet's rollout"),
                },
                Err(e) => {
                    tracing::error!(error = %e, "the SerinRollout's status is invalid; keeping the last state")
                }
            }
        }
        self.apply_policy(&object);
        self.latest.send_replace(Some(object));
    }

    /// The spec's judge keys over this member's own configuration; an
    /// invalid spec keeps the current policy (the leader's `SpecApplied`
    /// condition says why).
    fn apply_policy(&self, object: &SerinRollout) {
        let wanted = match &object.spec.judge {
            None => Ok(self.settings.judge.clone()),
            Some(spec) => super::judge_settings(spec, &self.settings.judge),
        };
        match wanted {
            Ok(settings) => {
                if let Err(e) = self.controller.set_policy(settings.policy) {
                    tracing::warn!(error = %e, "spec.judge not applied");
                }
            }
            Err(e) => tracing::warn!(error = %e, "spec.judge not applied"),
        }
    }

    /// Records the canary count when this member entered a new step, so its
    /// reports count the step's requests.
    fn note_step(&self, epoch: u64, step: u32) {
        let mut base = self.step_base.lock().expect("step base");
        if (base.0, base.1) != (epoch, step) {
            *base = (
                epoch,
                step,
                self.controller.stats().request_count(Target::Canary),
            );
            self.report_now.notify_one();
        }
    }
}

async fn follow(shared: Arc<Shared>) {
    let name = shared.settings.target.name.clone();
    let fields = format!("metadata.name={name}");
    let api = shared.fleet.api().clone();
    let mut backoff = Backoff::new();
    'list: loop {
        let list = match api.list(&ListParams::default().fields(&fields)).await {
            Ok(list) => list,
            Err(e) => {
                tracing::debug!(error = %e, "list failed");
                shared.set_connected(false);
                backoff.wait().await;
                continue;
            }
        };
        shared.set_connected(true);
        backoff.reset();
        let mut version = list.metadata.resource_version.unwrap_or_default();
        match list.items.into_iter().next() {
            Some(object) => shared.apply(object).await,
            None => missing(&shared).await,
        }
        loop {
            // Bookmarks are on by default.
            let params = WatchParams::default().fields(&fields).timeout(290);
            let mut stream = match api.watch(&params, &version).await {
                Ok(stream) => stream.boxed(),
                Err(e) => {
                    tracing::debug!(error = %e, "watch failed");
                    shared.set_connected(false);
                    backoff.wait().await;
                    continue 'list;
                }
            };
            shared.set_connected(true);
            let watched_at = Instant::now();
            let mut events = 0u64;
            while let Some(event) = stream.next().await {
                events += 1;
                match event {
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                        version = o.metadata.resource_version.clone().unwrap_or(version);
                        shared.apply(o).await;
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        version = o.metadata.resource_version.clone().unwrap_or(version);
                        missing(&shared).await;
                    }
                    Ok(WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                    Ok(WatchEvent::Error(status)) if status.code == 410 => {
                        tracing::debug!("watch expired (410 Gone): listing again");
                        continue 'list;
                    }
                    Ok(WatchEvent::Error(status)) => {
                        tracing::warn!(code = status.code, message = %status.message, "watch error");
                        backoff.wait().await;
                        continue 'list;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "watch stream broke");
                        shared.set_connected(false);
                        backoff.wait().await;
                        continue 'list;
                    }
                }
            }
            // The server ended the watch (its timeout, or a connection
            // closed under it): carry on from the last version seen, after a
            // pause if it ended at once with nothing, so a server that keeps
            // doing that is not hammered.
            if events == 0 && watched_at.elapsed() < Duration::from_secs(1) {
                backoff.wait().await;
            } else {
                backoff.reset();
            }
        }
    }
}

/// The object does not exist (yet, or any more): nothing says the canary
/// may have traffic, so it gets none.
async fn missing(shared: &Shared) {
    tracing::warn!(fleet = %shared.settings.target,
        "SerinRollout not found; the canary gets no traffic until it exists");
    shared.latest.send_replace(None);
    shared
        .controller
        .close_for_fleet("the SerinRollout does not exist")
        .await;
}

// === publish ===

async fn publish(shared: Arc<Shared>) {
    let mut changes = shared.controller.changes();
    let mut latest = shared.latest.subscribe();
    let mut backoff = Backoff::new();
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            r = latest.changed() => if r.is_err() { return },
        }
        loop {
            let view = shared.controller.fleet_view().await;
            let fleet_status = latest.borrow().as_ref().and_then(|o| o.status.clone());
            let pending = view.adopted
                && view.state.latched
                && fleet_status
                    .as_ref()
                    .is_some_and(|s| s.epoch == view.epoch && !s.latched);
            if !pending {
                break;
            }
            let pod = shared.settings.pod.clone();
            let defaults = shared.fleet.defaults().clone();
            let reason = view.state.reason.clone();
            let mut wrote = false;
            let written = shared
                .fleet
                .update_status(|object| {
                    let status = object.status.clone().unwrap_or_default();
                    let next = state::member_rollback(
                        &status,
                        view.epoch,
                        &reason,
                        &pod,
                        &defaults,
                        SystemTime::now(),
                    );
                    wrote = next.is_some();
                    Ok(next)
                })
                .await;
            match written {
                Ok(object) => {
                    if wrote {
                        tracing::warn!(fleet = %shared.settings.target, %reason,
                            "wrote this member's rollback to the fleet");
                    }
                    backoff.reset();
                    shared.latest.send_replace(Some(Arc::new(object)));
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write the rollback to the fleet yet; retrying");
                    backoff.wait().await;
                }
            }
        }
    }
}

// === report ===

fn window_summary(window: &WindowSnapshot) -> WindowSummary {
    WindowSummary {
        requests: window.requests,
        errors: window.errors,
        p95_ms: window.quantile(0.95).as_secs_f64() * 1000.0,
        buckets: window
            .latency_buckets()
            .map(|(bucket, count)| [bucket as u64, count])
            .collect(),
    }
}

fn window_of(summary: &WindowSummary) -> WindowSnapshot {
    WindowSnapshot::from_buckets(
        summary.requests,
        summary.errors,
        summary.buckets.iter().map(|[b, c]| (*b as usize, *c)),
    )
}

async fn summary(shared: &Shared) -> MemberSummary {
    let now = Instant::now();
    let stats = shared.controller.stats();
    let view = shared.controller.fleet_view().await;
    let (epoch, step, base) = *shared.step_base.lock().expect("step base");
    let step_requests = if (epoch, step) == (view.epoch, rollout_step(&view.state)) {
        stats.request_count(Target::Canary).saturating_sub(base)
    } else {
        0
    };
    MemberSummary {
        pod: shared.settings.pod.clone(),
        updated_at: rfc3339(SystemTime::now()),
        report_interval_ms: shared.settings.report_interval.as_millis() as u64,
        epoch: view.epoch,
        generation: shared.generation.load(Relaxed),
        phase: view.state.phase.as_str().to_string(),
        weight_bp: shared.controller.routes().load().canary_weight_bp,
        step: rollout_step(&view.state),
        step_requests,
        stable: window_summary(&stats.window_snapshot(Target::Stable, now)),
        canary: window_summary(&stats.window_snapshot(Target::Canary, now)),
    }
}

/// The step as the status shows it: from 1 in a rollout, else 0.
fn rollout_step(state: &crate::rollout::RolloutState) -> u32 {
    let in_rollout = matches!(state.phase, Phase::Progressing | Phase::Paused)
        || state.resume.is_some_and(|r| r.phase == Phase::Progressing);
    if in_rollout {
        state.step as u32 + 1
    } else {
        0
    }
}

async fn report(shared: Arc<Shared>) {
    let interval = shared.settings.report_interval;
    // Spread the members' writes over the interval.
    tokio::time::sleep(interval.mul_f64(jitter_unit())).await;
    let manager = format!("serin/{}", shared.settings.pod)
        .chars()
        .take(128)
        .collect::<String>();
    let params = PatchParams::apply(&manager).force();
    let target = &shared.settings.target;
    let name = target.members_name();
    loop {
        if shared.latest.borrow().is_some() {
            let entry = summary(&shared).await;
            let body = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": name,
                    "namespace": target.namespace,
                    "labels": {"app.kubernetes.io/managed-by": "serin", "serin.dev/fleet": target.name},
                },
                "data": {
                    entry.pod.clone(): serde_json::to_string(&entry).expect("a summary serialises"),
                },
            });
            if let Err(e) = shared
                .fleet
                .config_maps()
                .patch(&name, &params, &Patch::Apply(&body))
                .await
            {
                tracing::debug!(error = %e, "report not written");
            }
        }
        let jittered = interval.mul_f64(0.9 + 0.2 * jitter_unit());
        tokio::select! {
            _ = tokio::time::sleep(jittered) => {}
            _ = shared.report_now.notified() => {}
        }
    }
}

// === lead ===

/// The Lease record this member last saw, and when (by its own clock).
struct Observed {
    record: Option<(String, String, String)>,
    at: Instant,
}

async fn lead(shared: Arc<Shared>) {
    // The holder renews every half of the duration (a failed renewal is
    // retried at once at the look period); the others look more often, so a
    // dead holder is noticed soon after its lease runs out.
    let renew_every = shared.settings.lease_duration / 2;
    let look_every = (shared.settings.lease_duration / 5).min(Duration::from_secs(2));
    let mut observed = Observed {
        record: None,
        at: Instant::now(),
    };
    let mut next_renew = Instant::now();
    let mut last_reason_write = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_renew {
            let (held, renewed) = match try_lease(&shared, &mut observed).await {
                Ok(held) => (held, true),
                Err(e) => {
                    tracing::debug!(error = %e, "lease call failed");
                    // Without the API a leader cannot know it still leads.
                    let held = observed.at.elapsed() < shared.settings.lease_duration
                        && shared.leader.load(Relaxed);
                    (held, false)
                }
            };
            let was = shared.leader.swap(held, Relaxed);
            if held != was {
                tracing::info!(fleet = %shared.settings.target, leader = held,
                    "fleet leadership {}", if held { "taken" } else { "lost" });
            }
            next_renew = now
                + if held && renewed {
                    renew_every
                } else {
                    look_every
                };
        }
        if shared.leader.load(Relaxed) {
            let may_write_reason = last_reason_write.elapsed() >= shared.settings.report_interval;
            match lead_once(&shared, may_write_reason).await {
                Ok(true) => last_reason_write = Instant::now(),
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "leader pass failed"),
            }
        }
        let wait = shared
            .settings
            .leader_interval
            .min(next_renew.saturating_duration_since(Instant::now()));
        tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
    }
}

/// Takes, keeps or waits for the fleet's Lease. True while this member
/// holds it.
async fn try_lease(shared: &Shared, observed: &mut Observed) -> Result<bool, kube::Error> {
    let name = shared.settings.target.lease_name();
    let me = shared.settings.pod.clone();
    let seconds = shared.settings.lease_duration.as_secs().max(1);
    let now = rfc3339_micro(SystemTime::now());
    let Some(lease) = shared.leases.get_opt(&name).await? else {
        let lease: Lease = serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": shared.settings.target.namespace},
            "spec": {
                "holderIdentity": me, "leaseDurationSeconds": seconds,
                "acquireTime": now, "renewTime": now, "leaseTransitions": 0,
            }
        }))
        .expect("a lease");
        return match shared.leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let record = Some((
        holder.clone(),
        spec.renew_time
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        lease.metadata.resource_version.clone().unwrap_or_default(),
    ));
    if record != observed.record {
        observed.record = record;
        observed.at = Instant::now();
    }
    let duration = Duration::from_secs(
        spec.lease_duration_seconds
            .map_or(seconds, |s| s.max(1) as u64),
    );
    let expired = holder.is_empty() || observed.at.elapsed() >= duration;
    if holder != me && !expired {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(holder != me);
    let acquire = if holder == me {
        spec.acquire_time.as_ref().map(|t| t.0.to_string())
    } else {
        None
    }
    .unwrap_or_else(|| now.clone());
    let mut updated: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": shared.settings.target.namespace,
                     "resourceVersion": lease.metadata.resource_version},
        "spec": {
            "holderIdentity": me, "leaseDurationSeconds": seconds,
            "acquireTime": acquire, "renewTime": now, "leaseTransitions": transitions,
        }
    }))
    .expect("a lease");
    updated.metadata.labels = lease.metadata.labels.clone();
    match shared
        .leases
        .replace(&name, &PostParams::default(), &updated)
        .await
    {
        Ok(written) => {
            observed.record = Some((
                me,
                now,
                written.metadata.resource_version.unwrap_or_default(),
            ));
            observed.at = Instant::now();
            Ok(true)
        }
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// RFC 3339 with microseconds, as a Lease's MicroTime.
fn rfc3339_micro(t: SystemTime) -> String {
    let millis = rfc3339(t);
    let micros = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_micros()
        % 1000;
    // `...SS.mmmZ` → `...SS.mmmuuuZ`
    format!("{}{micros:03}Z", millis.trim_end_matches('Z'))
}

/// A member that has not reported for this many of its report intervals
/// counts as disconnected or gone: its window leaves the aggregate.
pub const FRESH_INTERVALS: f64 = 3.0;
/// ... and after this many, its report is removed from the ConfigMap.
pub const GONE_INTERVALS: f64 = 10.0;

/// How long since `member` reported, in its own report intervals (0 for a
/// time in the future: clocks differ a little between nodes).
pub fn member_age(member: &MemberSummary, now: SystemTime) -> f64 {
    let interval = Duration::from_millis(member.report_interval_ms.max(100));
    parse_time(&member.updated_at)
        .map(|t| now.duration_since(t).unwrap_or_default())
        .map_or(f64::INFINITY, |age| {
            age.as_secs_f64() / interval.as_secs_f64()
        })
}

/// Removes the reports of members gone for [`GONE_INTERVALS`] (a replaced
/// pod's name is never reused), so the ConfigMap stays small.
async fn prune(shared: &Shared, gone: &[&MemberSummary]) -> Result<(), FleetError> {
    let keys: serde_json::Map<String, serde_json::Value> = gone
        .iter()
        .map(|m| (m.pod.clone(), serde_json::Value::Null))
        .collect();
    shared
        .fleet
        .config_maps()
        .patch(
            &shared.settings.target.members_name(),
            &PatchParams::default(),
            &Patch::Merge(&json!({ "data": keys })),
        )
        .await?;
    tracing::info!(
        removed = gone.len(),
        "removed the reports of members gone from the fleet"
    );
    Ok(())
}

/// The members' reports, read at most every half report interval.
async fn reports(shared: &Shared) -> Result<Vec<MemberSummary>, FleetError> {
    let due = shared
        .reports
        .lock()
        .expect("reports")
        .0
        .is_none_or(|at| at.elapsed() >= shared.settings.report_interval / 2);
    if due {
        let read = shared.fleet.members().await?;
        *shared.reports.lock().expect("reports") = (Some(Instant::now()), read);
    }
    Ok(shared.reports.lock().expect("reports").1.clone())
}

/// Writes the aggregate to `status.fleet` when the members changed (how
/// many, or the highest epoch), or every three report intervals while its
/// numbers move: for people and `kubectl get`, so it need not be fresher.
async fn write_aggregate(shared: &Shared, status: &SerinRolloutStatus, aggregate: FleetAggregate) {
    let shown = status.fleet.as_ref();
    let membership_changed = shown.is_none_or(|f| {
        f.members != aggregate.members
            || f.highest_member_epoch != aggregate.highest_member_epoch
            || f.leader != aggregate.leader
    });
    let last = shared.aggregate.lock().expect("aggregate").clone();
    let numbers_moved = last.as_ref().is_none_or(|(_, a)| {
        (a.stable.requests, a.canary.requests, a.step_requests)
            != (
                aggregate.stable.requests,
                aggregate.canary.requests,
                aggregate.step_requests,
            )
    });
    let due = last
        .as_ref()
        .is_none_or(|(at, _)| at.elapsed() >= shared.settings.report_interval * 3);
    if !(membership_changed || (numbers_moved && due)) {
        return;
    }
    let patch = json!({ "status": { "fleet": aggregate } });
    match shared
        .fleet
        .api()
        .patch_status(
            &shared.settings.target.name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => *shared.aggregate.lock().expect("aggregate") = Some((Instant::now(), aggregate)),
        Err(e) => tracing::debug!(error = %e, "aggregate not written"),
    }
}

/// One pass of the leader: apply a new spec, judge the aggregate, move the
/// steps. Returns whether it wrote a hold reason (rate-limited).
async fn lead_once(shared: &Shared, may_write_reason: bool) -> Result<bool, FleetError> {
    let Some(object) = shared.latest.borrow().clone() else {
        return Ok(false);
    };
    let pod = &shared.settings.pod;
    let leader_actor = format!("leader@{pod}");
    let defaults = shared.fleet.defaults().clone();
    let generation = object.metadata.generation.unwrap_or(0);
    let status = object.status.clone().unwrap_or_default();
    if status.observed_generation != generation || status.phase.is_empty() {
        let written = shared.fleet.reconcile(&leader_actor).await?;
        shared.latest.send_replace(Some(Arc::new(written)));
        return Ok(false);
    }

    // The aggregate of every member that reported lately.
    let now = SystemTime::now();
    let members = reports(shared).await?;
    let fresh: Vec<_> = members
        .iter()
        .filter(|m| member_age(m, now) <= FRESH_INTERVALS)
        .collect();
    let gone: Vec<_> = members
        .iter()
        .filter(|m| member_age(m, now) > GONE_INTERVALS)
        .collect();
    if !gone.is_empty() {
        prune(shared, &gone).await?;
        shared.reports.lock().expect("reports").0 = None;
    }
    let mut stable = WindowSnapshot::default();
    let mut canary = WindowSnapshot::default();
    let mut step_requests = 0;
    // Only members that run the fleet's epoch are judged: a report from an
    // older one is about another course (the outcomes that got the canary
    // rolled back, say, before an operator raised it again; a member that
    // leaves the latch restarts its windows).
    for m in fresh.iter().filter(|m| m.epoch == status.epoch) {
        stable.merge(&window_of(&m.stable));
        canary.merge(&window_of(&m.canary));
        if m.step == status.step {
            step_requests += m.step_requests;
        }
    }
    let ms = |w: &WindowSnapshot| w.quantile(0.95).as_secs_f64() * 1000.0;
    let aggregate = FleetAggregate {
        leader: pod.clone(),
        members: fresh.len() as u32,
        highest_member_epoch: members.iter().map(|m| m.epoch).max().unwrap_or(0),
        step_requests,
        stable: UpstreamAggregate {
            requests: stable.requests,
            errors: stable.errors,
            p95_ms: ms(&stable),
        },
        canary: UpstreamAggregate {
            requests: canary.requests,
            errors: canary.errors,
            p95_ms: ms(&canary),
        },
        updated_at: rfc3339(now),
    };
    write_aggregate(shared, &status, aggregate).await;

    // A canary without weight is judged only while it is shadowed (the
    // shadow step advances, or a breach of the aggregate reverts it).
    let shadowing = status.phase == Phase::Shadowing.as_str();
    if status.latched || (status.weight_bp == 0 && !shadowing) {
        return Ok(false);
    }
    let judge_settings = match &object.spec.judge {
        Some(spec) => super::judge_settings(spec, &shared.settings.judge)
            .unwrap_or_else(|_| shared.settings.judge.clone()),
        None => shared.settings.judge.clone(),
    };
    let Ok(judge) = Judge::new(judge_settings.policy) else {
        return Ok(false);
    };
    let verdict = judge.evaluate_windows(&stable, &canary, shared.settings.leader_interval);
    let Some(_) = state::leader_tick(
        &status,
        &verdict,
        step_requests,
        pod,
        &defaults,
        now,
        may_write_reason,
    ) else {
        return Ok(false);
    };
    let written = shared
        .fleet
        .update_status(|fresh_object| {
            let current = fresh_object.status.clone().unwrap_or_default();
            // Decided on `status`: if the fleet moved meanwhile, decide again
            // on the next pass rather than on stale numbers.
            if current.epoch != status.epoch
                || current.phase != status.phase
                || current.step != status.step
            {
                return Ok(None);
            }
            Ok(state::leader_tick(
                &current,
                &verdict,
                step_requests,
                pod,
                &defaults,
                SystemTime::now(),
                may_write_reason,
            ))
        })
        .await?;
    shared.latest.send_replace(Some(Arc::new(written)));
    Ok(true)
}
