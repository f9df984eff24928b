//! The operators' calls on a fleet's `SerinRollout`, through the Kubernetes
//! API as kubectl reaches it: `serin status|weight|rollout|pause|resume|
//! promote|rollback --fleet NAMESPACE/NAME`, and a member's own control API,
//! whose mutating calls act on the fleet rather than on the one pod.
//!
//! `weight`, `rollout` and `pause` change the spec (a new generation, the
//! desired state that GitOps would also write), then apply it to the status
//! at once, so the change does not wait for the fleet's leader (or need
//! one). `promote`, `rollback` and `resume` act on the status. Every status
//! write carries the `resourceVersion` it was computed from; on a conflict
//! it is computed again from a fresh read, so a concurrent rollback is never
//! overwritten.

use std::time::{Duration, SystemTime};

use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};

use k8s_openapi::api::core::v1::ConfigMap;

use super::crd::{MemberSummary, SerinRollout, SerinRolloutStatus};
use super::state::{self, Call, RolloutDefaults};
use super::FleetRef;
use crate::defaults;
use crate::rollout::{rfc3339, validate_steps, Phase, RolloutError};

/// Attempts at a status write that keeps meeting conflicts.
const CONFLICT_RETRIES: usize = 20;

/// Why a fleet call failed. The text is shown to users as is.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// No kubeconfig or in-cluster configuration.
    #[error(
        "cannot configure a Kubernetes client: {0}. Set KUBECONFIG or run inside a pod \
         with a service account"
    )]
    Config(String),
    /// The object does not exist.
    #[error(
        "SerinRollout {0} not found; create it (see deploy/README.md, \"Fleet rollouts\") \
         after installing the CRD with `serin crd | kubectl apply -f -`"
    )]
    NotFound(FleetRef),
    /// The API server answered with an error, or could not be reached.
    #[error("Kubernetes API: {}", describe(.0))]
    Api(#[from] kube::Error),
    /// The call makes no sense in the current state; nothing changed.
    #[error(transparent)]
    Refused(#[from] RolloutError),
    /// Writes kept conflicting with others.
    #[error("SerinRollout {0}: gave up after {CONFLICT_RETRIES} conflicting writes; try again")]
    Contended(FleetRef),
}

impl FleetError {
    /// True when the call was refused because of the rollout's state (an
    /// API answers 409) rather than a bad value (400).
    pub fn is_state_conflict(&self) -> bool {
        matches!(
            self,
            FleetError::Refused(
                RolloutError::Latched
                    | RolloutError::NotProgressing { .. }
                    | RolloutError::NothingToResume { .. }
            )
        )
    }
}

/// An API error in words that say what to do next.
fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if status.code == 401 => format!(
            "{} (401 Unauthorized): the API server refused these credentials; check the kubeconfig's user (or the pod's service account token)",
            status.message
        ),
        kube::Error::Api(status) if status.code == 403 => format!(
            "{} (403 Forbidden): this account lacks the fleet's RBAC; see deploy/README.md, \"What the RBAC grants, and why\"",
            status.message
        ),
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        kube::Error::Service(_) | kube::Error::HyperError(_) => format!(
            "cannot reach the API server ({e}); check KUBECONFIG, its current context and the network"
        ),
        e => e.to_string(),
    }
}

/// True for a 409 Conflict from the API server.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

/// True for a 404 Not Found from the API server.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

/// The rollout defaults of a fleet: serin's built-in ones, so that the same
/// spec means the same rollout whoever applies it (the CLI, or a member
/// configured otherwise).
pub fn fleet_defaults() -> RolloutDefaults {
    RolloutDefaults {
        steps: defaults::ROLLOUT_STEPS.to_vec(),
        hold: defaults::ROLLOUT_HOLD,
        min_requests_per_step: defaults::MIN_REQUESTS_PER_STEP,
        shadow_percent: defaults::SHADOW_PERCENT,
    }
}

/// One fleet's object in the API, and its members' reports.
#[derive(Clone)]
pub struct Fleet {
    api: Api<SerinRollout>,
    config_maps: Api<ConfigMap>,
    target: FleetRef,
    defaults: RolloutDefaults,
}

impl Fleet {
    /// A client as kubectl would find one: `KUBECONFIG` or `~/.kube/config`,
    /// else the pod's service account.
    pub async fn connect(target: FleetRef) -> Result<Self, FleetError> {
        let client = Client::try_default()
            .await
            .map_err(|e| FleetError::Config(e.to_string()))?;
        Ok(Self::new(client, target))
    }

    /// The fleet `target` through `client`.
    pub fn new(client: Client, target: FleetRef) -> Self {
        Self {
            api: Api::namespaced(client.clone(), &target.namespace),
            config_maps: Api::namespaced(client, &target.namespace),
            target,
            defaults: fleet_defaults(),
        }
    }

    /// The ConfigMaps of the fleet's namespace (the members report into
    /// [`FleetRef::members_name`]).
    pub fn config_maps(&self) -> &Api<ConfigMap> {
        &self.config_maps
    }

    /// Every member's latest report (none before the first).
    pub async fn members(&self) -> Result<Vec<MemberSummary>, FleetError> {
        let Some(map) = self
            .config_maps
            .get_opt(&self.target.members_name())
            .await?
        else {
            return Ok(Vec::new());
        };
        let mut members: Vec<MemberSummary> = map
            .data
            .unwrap_or_default()
            .values()
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect();
        members.sort_by(|a, b| a.pod.cmp(&b.pod));
        Ok(members)
    }

    /// `NAMESPACE/NAME`.
    pub fn target(&self) -> &FleetRef {
        &self.target
    }

    /// The typed API handle.
    pub fn api(&self) -> &Api<SerinRollout> {
        &self.api
    }

    /// The defaults its spec falls back on.
    pub fn defaults(&self) -> &RolloutDefaults {
        &self.defaults
    }

    /// Reads the object.
    pub async fn get(&self) -> Result<SerinRollout, FleetError> {
        self.api
            .get_opt(&self.target.name)
            .await?
            .ok_or_else(|| FleetError::NotFound(self.target.clone()))
    }

    /// Computes a new status from a fresh read with `next` and writes it
    /// with that read's `resourceVersion` as a precondition, again from a
    /// fresh read on every conflict. `next` returning `None` writes nothing.
    /// Returns the object as last read or written.
    pub async fn update_status<F>(&self, mut next: F) -> Result<SerinRollout, FleetError>
    where
        F: FnMut(&SerinRollout) -> Result<Option<SerinRolloutStatus>, FleetError>,
    {
        for _ in 0..CONFLICT_RETRIES {
            let object = self.get().await?;
            let Some(status) = next(&object)? else {
                return Ok(object);
            };
            let rv = object.metadata.resource_version.clone().unwrap_or_default();
            let patch = state::rollout_patch(&status, &rv);
            match self
                .api
                .patch_status(
                    &self.target.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(written) => return Ok(written),
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(FleetError::Contended(self.target.clone()))
    }

    /// Merges `patch` into the spec (a new generation when it changes
    /// anything), then applies the spec to the status.
    async fn change_spec(&self, patch: Value, actor: &str) -> Result<SerinRollout, FleetError> {
        let body = json!({ "spec": patch });
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self
                .api
                .patch(
                    &self.target.name,
                    &PatchParams::default(),
                    &Patch::Merge(&body),
                )
                .await
            {
                Ok(_) => break,
                // A merge patch carries no precondition, so a conflict is the
                // server's own contention: the same patch again is right.
                Err(e) if is_conflict(&e) && attempts < CONFLICT_RETRIES => continue,
                Err(e) if is_not_found(&e) => {
                    return Err(FleetError::NotFound(self.target.clone()))
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.reconcile(actor).await
    }

    /// Applies the spec's generation to the status if nobody has yet.
    pub async fn reconcile(&self, actor: &str) -> Result<SerinRollout, FleetError> {
        let defaults = self.defaults.clone();
        let floor = self.highest_member_epoch().await;
        self.update_status(|object| {
            Ok(state::reconcile(
                &with_epoch_floor(object, floor),
                &defaults,
                actor,
                SystemTime::now(),
            ))
        })
        .await
    }

    /// The highest epoch any member reports running (0 when none can be
    /// read): an explicit raise must go above it, or those members would take
    /// it for an old status and ignore it.
    async fn highest_member_epoch(&self) -> u64 {
        match self.members().await {
            Ok(members) => members.iter().map(|m| m.epoch).max().unwrap_or(0),
            Err(e) => {
                tracing::debug!(error = %e, "members' reports not read");
                0
            }
        }
    }

    /// `serin weight PCT --fleet`: phase `manual` at `pct`, a new epoch.
    pub async fn set_weight(&self, pct: f64, actor: &str) -> Result<SerinRollout, FleetError> {
        let pct = state::checked_weight(pct)?;
        self.change_spec(
            json!({"canaryWeight": pct, "rollout": null, "shadow": null, "paused": null,
                   "restartedAt": rfc3339(SystemTime::now())}),
            actor,
        )
        .await
    }

    /// `serin shadow PCT --fleet`: phase `shadowing` at `pct`, a new epoch.
    pub async fn shadow(&self, pct: f64, actor: &str) -> Result<SerinRollout, FleetError> {
        let pct = state::checked_shadow(pct)?;
        self.change_spec(
            json!({"shadow": pct, "canaryWeight": null, "rollout": null, "paused": null,
                   "restartedAt": rfc3339(SystemTime::now())}),
            actor,
        )
        .await
    }

    /// `serin rollout --fleet`: a progressive rollout from step 1 (or from
    /// a shadow step of `shadow`), a new epoch. `None` keeps the spec's
    /// default (serin's built-in steps and hold, no shadow step).
    pub async fn rollout(
        &self,
        steps: Option<Vec<f64>>,
        hold: Option<Duration>,
        shadow: Option<Duration>,
        actor: &str,
    ) -> Result<SerinRollout, FleetError> {
        if let Some(steps) = &steps {
            validate_steps(steps)?;
        }
        let mut plan = serde_json::Map::new();
        if let Some(steps) = steps {
            plan.insert("steps".into(), json!(steps));
        }
        if let Some(hold) = hold {
            plan.insert("hold".into(), json!(defaults::duration_text(hold)));
        }
        if let Some(shadow) = shadow {
            plan.insert("shadow".into(), json!(defaults::duration_text(shadow)));
        }
        self.change_spec(
            json!({"rollout": plan, "canaryWeight": null, "shadow": null, "paused": null,
                   "restartedAt": rfc3339(SystemTime::now())}),
            actor,
        )
        .await
    }

    /// `serin pause --fleet`: `spec.paused`, refused unless a rollout runs.
    pub async fn pause(&self, actor: &str) -> Result<SerinRollout, FleetError> {
        let object = self.get().await?;
        let phase = current_phase(&object);
        match phase {
            Phase::Progressing | Phase::Paused => {}
            Phase::RolledBack => return Err(RolloutError::Latched.into()),
            phase => return Err(RolloutError::NotProgressing { phase }.into()),
        }
        self.change_spec(json!({"paused": true}), actor).await
    }

    /// `serin resume --fleet`: a paused rollout runs again; a rolled-back
    /// canary returns to where it was (a new epoch).
    pub async fn resume(&self, actor: &str) -> Result<SerinRollout, FleetError> {
        let object = self.get().await?;
        if object.spec.paused {
            self.change_spec(json!({"paused": null}), actor).await?;
        }
        self.call(Call::Resume, actor).await
    }

    /// `serin promote --fleet`.
    pub async fn promote(&self, actor: &str) -> Result<SerinRollout, FleetError> {
        self.call(Call::Promote, actor).await
    }

    /// `serin rollback --fleet`.
    pub async fn rollback(&self, actor: &str) -> Result<SerinRollout, FleetError> {
        self.call(Call::Rollback, actor).await
    }

    async fn call(&self, call: Call, actor: &str) -> Result<SerinRollout, FleetError> {
        let defaults = self.defaults.clone();
        let floor = self.highest_member_epoch().await;
        let mut first = true;
        self.update_status(|object| {
            let status = with_epoch_floor(object, floor).status.unwrap_or_default();
            match state::call(&status, &call, &defaults, actor, SystemTime::now()) {
                Ok(next) => {
                    first = false;
                    Ok(next)
                }
                // Resuming what another call already resumed is done.
                Err(RolloutError::NothingToResume { .. }) if !first => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }
}

/// `object` with the members' highest epoch known to be at least `floor`
/// (what [`state`] reads to number the next explicit raise).
fn with_epoch_floor(object: &SerinRollout, floor: u64) -> SerinRollout {
    let mut object = object.clone();
    let status = object.status.get_or_insert_with(Default::default);
    let fleet = status.fleet.get_or_insert_with(Default::default);
    fleet.highest_member_epoch = fleet.highest_member_epoch.max(floor);
    object
}

/// The phase the object's status is in (`steady` before any).
pub fn current_phase(object: &SerinRollout) -> Phase {
    object
        .status
        .as_ref()
        .and_then(|s| state::parse_phase(&s.phase))
        .unwrap_or(Phase::Steady)
}

/// The fleet's rollout as `serin status --fleet --json` and a member's
/// control API show it: the status's rollout keys with `canary_weight` in
/// percent (as `/status`), and every member's report without histograms.
pub fn summary(object: &SerinRollout, members: &[MemberSummary]) -> Value {
    let status = object.status.clone().unwrap_or_default();
    let members: Vec<Value> = members
        .iter()
        .map(|m| {
            json!({
                "pod": m.pod, "updated_at": m.updated_at, "epoch": m.epoch,
                "report_interval_ms": m.report_interval_ms,
                "generation": m.generation, "phase": m.phase,
                "canary_weight": crate::rollout::percent(m.weight_bp), "step": m.step,
                "step_requests": m.step_requests,
                "stable": {"requests": m.stable.requests, "errors": m.stable.errors, "p95_ms": m.stable.p95_ms},
                "canary": {"requests": m.canary.requests, "errors": m.canary.errors, "p95_ms": m.canary.p95_ms},
            })
        })
        .collect();
    json!({
        "fleet": format!("{}/{}", object.metadata.namespace.clone().unwrap_or_default(),
                         object.metadata.name.clone().unwrap_or_default()),
        "generation": object.metadata.generation.unwrap_or(0),
        "observed_generation": status.observed_generation,
        "phase": if status.phase.is_empty() { "steady".to_string() } else { status.phase.clone() },
        "canary_weight": crate::rollout::percent(status.weight_bp),
        "step": status.step,
        "steps": status.steps,
        "hold": status.hold,
        "shadow": {
            "percent": if status.phase == Phase::Shadowing.as_str() {
                crate::rollout::percent(status.shadow_bp)
            } else {
                0.0
            },
            "hold": status.shadow_hold,
        },
        "latched": status.latched,
        "reason": status.reason,
        "actor": status.actor,
        "epoch": status.epoch,
        "conditions": status.conditions,
        "aggregate": status.fleet,
        "members": members,
        "history": status.history,
    })
}

/// `serin status|weight|rollout|pause|resume|promote|rollback --fleet`:
/// one call on the fleet's object through kubeconfig, then a summary of the
/// fleet (or its JSON with `json`). `status --watch` refreshes every second.
pub async fn run_cli(
    call: crate::client::Call,
    target: FleetRef,
    json: bool,
) -> Result<(), FleetError> {
    use crate::client::Call as C;
    let fleet = Fleet::connect(target).await?;
    let actor = "cli";
    loop {
        let object = match &call {
            C::Status { .. } => fleet.get().await?,
            C::Weight(pct) => fleet.set_weight(*pct, actor).await?,
            C::Shadow(pct) => {
                let pct = pct.unwrap_or(fleet.defaults().shadow_percent);
                fleet.shadow(pct, actor).await?
            }
            C::Rollout {
                steps,
                hold,
                shadow,
            } => {
                let parse = |text: &Option<String>| {
                    text.as_deref().map(crate::rollout::parse_hold).transpose()
                };
                let (hold, shadow) = (parse(hold)?, parse(shadow)?);
                fleet.rollout(steps.clone(), hold, shadow, actor).await?
            }
            C::Pause => fleet.pause(actor).await?,
            C::Resume => fleet.resume(actor).await?,
            C::Promote => fleet.promote(actor).await?,
            C::Rollback => fleet.rollback(actor).await?,
        };
        let members = fleet.members().await.unwrap_or_else(|e| {
            eprintln!("serin: the members' reports cannot be read ({e}); showing the rollout only");
            Vec::new()
        });
        let summary = summary(&object, &members);
        if json {
            println!("{summary:#}");
        } else {
            print!("{}", summary_text(&summary, SystemTime::now()));
        }
        if !matches!(call, C::Status { watch: true }) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The human summary of [`summary`]: the fleet's rollout, then one line per
/// member, marking those that have not reported lately or run another epoch.
pub fn summary_text(summary: &Value, now: SystemTime) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let s = |key: &str| match &summary[key] {
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), number_text),
        other => other.to_string().trim_matches('"').to_string(),
    };
    let _ = writeln!(
        out,
        "fleet {}: {} at {}% (step {} of {}), epoch {}, generation {}/{} applied",
        s("fleet"),
        s("phase"),
        s("canary_weight"),
        s("step"),
        summary["steps"].as_array().map_or(0, Vec::len),
        s("epoch"),
        s("observed_generation"),
        s("generation"),
    );
    if !summary["reason"].as_str().unwrap_or("").is_empty() {
        let _ = writeln!(out, "reason: {} (by {})", s("reason"), s("actor"));
    }
    if let Some(agg) = summary["aggregate"].as_object() {
        let _ = writeln!(
            out,
            "aggregate of {} members (leader {}): stable {} req / {} err, p95 {:.1} ms; canary {} req / {} err, p95 {:.1} ms",
            agg["members"], agg["leader"].as_str().unwrap_or(""),
            agg["stable"]["requests"], agg["stable"]["errors"], agg["stable"]["p95_ms"].as_f64().unwrap_or(0.0),
            agg["canary"]["requests"], agg["canary"]["errors"], agg["canary"]["p95_ms"].as_f64().unwrap_or(0.0),
        );
    }
    let epoch = summary["epoch"].as_u64().unwrap_or(0);
    let generation = summary["generation"].as_i64().unwrap_or(0);
    let _ = writeln!(
        out,
        "{:<32} {:>8} {:>12} {:>22} {:>22}  state",
        "MEMBER", "WEIGHT", "PHASE", "STABLE req/err/p95", "CANARY req/err/p95"
    );
    for m in summary["members"].as_array().into_iter().flatten() {
        let age = m["updated_at"]
            .as_str()
            .and_then(state::parse_time)
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default();
        let mut notes = Vec::new();
        let member = super::crd::MemberSummary {
            updated_at: m["updated_at"].as_str().unwrap_or("").to_string(),
            report_interval_ms: m["report_interval_ms"].as_u64().unwrap_or(0),
            ..Default::default()
        };
        if super::member::member_age(&member, now) > super::member::FRESH_INTERVALS {
            notes.push(format!(
                "DISCONNECTED or gone: no report for {}s",
                age.as_secs()
            ));
        } else {
            notes.push(format!("connected, reported {}s ago", age.as_secs()));
        }
        if m["epoch"].as_u64() != Some(epoch) || m["generation"].as_i64() != Some(generation) {
            notes.push("not on the latest generation".to_string());
        } else {
            notes.push("latest generation".to_string());
        }
        let window = |w: &Value| {
            format!(
                "{}/{}/{:.1}ms",
                w["requests"],
                w["errors"],
                w["p95_ms"].as_f64().unwrap_or(0.0)
            )
        };
        let _ = writeln!(
            out,
            "{:<32} {:>7}% {:>12} {:>22} {:>22}  {}",
            m["pod"].as_str().unwrap_or(""),
            number_text(m["canary_weight"].as_f64().unwrap_or(0.0)),
            m["phase"].as_str().unwrap_or(""),
            window(&m["stable"]),
            window(&m["canary"]),
            notes.join(", ")
        );
    }
    out
}

/// A number as people write it: `20`, `12.5`.
fn number_text(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        x.to_string()
    }
}
