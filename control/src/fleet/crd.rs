//! The `SerinRollout` custom resource (`serin.dev/v1alpha1`): the one
//! rollout that every member of a fleet applies.
//!
//! These Rust types are the single source of the CRD: `serin crd` prints the
//! YAML generated from them, and a test checks that the copies shipped in
//! `deploy/` and the Helm chart are that output, byte for byte.
//!
//! - `spec` is what an operator (or GitOps) wants: a weight, a shadow or a
//!   progressive rollout (which may begin with a shadow step), `paused`,
//!   and the judge policy with the config file's `[judge]` keys. A new
//!   `metadata.generation` is a new desired state.
//! - `status` is the fleet's rollout as it stands: the phase, weight, step,
//!   latch and history that every member applies to its route table, the
//!   `epoch` that orders explicit raises against rollbacks, and the leader's
//!   aggregate.
//!
//! The members' own summaries ([`MemberSummary`]) are not in this object,
//! which every member watches: a write per member per report would reach
//! every member, N² events of an object N entries long. They go, one key per
//! member, into the ConfigMap `serin-NAME-members`, which only the leader
//! (and `serin status --fleet`) reads, as Kubernetes moved node heartbeats
//! out of the Node object into Leases.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Transitions kept in `status.history`; older ones are dropped first. The
/// object must stay small: every member watches it.
pub const STATUS_HISTORY_LIMIT: usize = 30;

/// What an operator wants of the fleet's canary.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "serin.dev",
    version = "v1alpha1",
    kind = "SerinRollout",
    plural = "serinrollouts",
    shortname = "srr",
    category = "serin",
    namespaced,
    status = "SerinRolloutStatus",
    doc = "One canary rollout shared by every serin of a workload (serin run --fleet NAMESPACE/NAME).",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Weight","type":"number","description":"canary weight, percent","jsonPath":".status.canaryWeight"}"#,
    printcolumn = r#"{"name":"Step","type":"integer","jsonPath":".status.step"}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.fleet.members"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.canaryWeight) && has(self.rollout))",
    "message": "give spec.canaryWeight or spec.rollout, not both"
}, {
    "rule": "!has(self.shadow) || !(has(self.canaryWeight) || has(self.rollout))",
    "message": "give spec.shadow alone, without spec.canaryWeight or spec.rollout"
}]))]
pub struct SerinRolloutSpec {
    /// Hold the canary at this weight, in percent (0-100): phase `manual`.
    /// Give this or `rollout`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub canary_weight: Option<f64>,
    /// Move the canary through these steps: phase `progressing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// Shadow the canary: no user is sent to it, and this percent (above 0,
    /// at most 100) of stable's eligible requests are copied to it and
    /// judged: phase `shadowing`. Give it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub shadow: Option<f64>,
    /// Freeze a progressing rollout at its step (the judges still guard it).
    #[serde(default, skip_serializing_if = "is_false")]
    pub paused: bool,
    /// Set by `serin rollout|weight --fleet` (RFC 3339), so that repeating
    /// the same command starts it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<String>,
    /// The judge policy, with the keys of the config file's `[judge]`
    /// (`max_error_rate`, `max_p95`, ...). Keys left out take each member's
    /// own configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeSpec>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

/// A progressive rollout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Canary weights in percent, strictly increasing, ending at 100.
    /// Default: serin's, [5, 25, 50, 100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<f64>>,
    /// Minimum time on each step, e.g. `60s` or `5m`. Default: serin's, 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
    /// Canary requests the whole fleet must serve on a step before it
    /// advances. Default: serin's, 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests_per_step: Option<u64>,
    /// First shadow the canary this long (phase `shadowing`: every eligible
    /// request of stable's copied to it, no user sent to it), e.g. `60s`,
    /// then move to the first step. Default: no shadow step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
}

/// The judge policy: the config file's `[judge]` keys, each optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JudgeSpec {
    /// Rolling window, e.g. `10s`. A member whose data plane runs another
    /// window keeps its own and says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// How often each judge looks, e.g. `10ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Canary requests needed before any verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    /// Highest acceptable canary error rate, 0-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// Highest acceptable canary p95, e.g. `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95: Option<String>,
    /// Chance per step that a healthy canary is reverted, e.g. 0.002.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Chance per hour a step lasts that a healthy canary is reverted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha_per_hour: Option<f64>,
    /// How many times stable's the canary's latencies (less 1 ms) must be
    /// for a latency breach, e.g. 1.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_latency_shift: Option<f64>,
    /// The window judge's key: read as `min_latency_shift`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95_ratio: Option<f64>,
    /// No longer used: refused with what to write instead (`alpha`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
    /// How much higher than stable's the canary's error rate must be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_error_rate_difference: Option<f64>,
    /// Canary errors in a row that revert at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_consecutive_errors: Option<u32>,
}

/// The fleet's rollout as it stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SerinRolloutStatus {
    /// `steady`, `manual`, `shadowing`, `progressing`, `paused`, `promoted`
    /// or `rolled_back`.
    #[serde(default)]
    pub phase: String,
    /// The canary weight in basis points (0-10000): what every member's
    /// route table holds.
    #[serde(default)]
    pub weight_bp: u16,
    /// The same weight in percent, for people and `kubectl get`.
    #[serde(default)]
    pub canary_weight: f64,
    /// The current step, from 1; 0 outside a rollout.
    #[serde(default)]
    pub step: u32,
    /// The rollout's steps, in percent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<f64>,
    /// The hold at each step, e.g. `60s`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hold: String,
    /// Canary requests the fleet must serve on each step.
    #[serde(default)]
    pub min_requests_per_step: u64,
    /// The share of stable's eligible requests copied to the canary in
    /// phase `shadowing`, in basis points (0-10000).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shadow_bp: u16,
    /// The hold of the rollout's shadow step, e.g. `60s`, while it is
    /// current (or was, when it was rolled back).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub shadow_hold: String,
    /// When the current step began (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_start_time: Option<String>,
    /// True while the canary is rolled back and latched at 0.
    #[serde(default)]
    pub latched: bool,
    /// Why the rollout stands where it does, with numbers.
    #[serde(default)]
    pub reason: String,
    /// Who made the last transition: a member's pod name (its judge, or its
    /// control API as `api@POD`), `cli`, or `leader@POD` for the fleet's judge.
    #[serde(default)]
    pub actor: String,
    /// Counts explicit raises (`weight`, `rollout`, `resume` of a rolled-back
    /// canary). A rollback applies to the epoch it was decided in and no
    /// later write in that epoch undoes it.
    #[serde(default)]
    pub epoch: u64,
    /// Where `resume` takes a rolled-back canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<ResumeStatus>,
    /// The spec's weight-or-rollout that the status last applied, so that a
    /// change of `paused` or `judge` alone does not restart a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<AppliedSpec>,
    /// The `metadata.generation` the status has applied.
    #[serde(default)]
    pub observed_generation: i64,
    /// `SpecApplied` and `RolledBack`, in the Kubernetes convention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Recent transitions, oldest first, at most [`STATUS_HISTORY_LIMIT`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<FleetTransition>,
    /// The leader's aggregate over every fresh member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetAggregate>,
}

/// Where `resume` takes a rolled-back canary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResumeStatus {
    /// `manual`, `shadowing`, `progressing` or `promoted`.
    pub phase: String,
    /// The weight to restore, in basis points.
    pub weight_bp: u16,
}

/// The spec's weight-or-rollout part, as applied.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppliedSpec {
    /// `spec.canaryWeight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_weight: Option<f64>,
    /// `spec.rollout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// `spec.shadow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<f64>,
    /// `spec.restartedAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<String>,
}

/// A status condition (the Kubernetes `metav1.Condition` shape).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `SpecApplied` or `RolledBack`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word.
    pub reason: String,
    /// For people.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation the condition was set for.
    #[serde(default)]
    pub observed_generation: i64,
}

/// One entry of `status.history`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetTransition {
    /// RFC 3339 UTC.
    pub at: String,
    /// Weight before, percent.
    pub from: f64,
    /// Weight after, percent.
    pub to: f64,
    /// Phase after.
    pub phase: String,
    /// Why.
    pub reason: String,
    /// Who (as `status.actor`).
    pub actor: String,
}

/// What one member last reported: the value of its key in the ConfigMap
/// `serin-NAME-members` (JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberSummary {
    /// The member's pod name (its identity in the fleet).
    pub pod: String,
    /// When it wrote this (RFC 3339). A member silent for three report
    /// intervals counts as disconnected or gone, and its entry is removed
    /// after ten.
    pub updated_at: String,
    /// How often it reports, ms.
    #[serde(default)]
    pub report_interval_ms: u64,
    /// The epoch and generation it has applied.
    #[serde(default)]
    pub epoch: u64,
    /// The `metadata.generation` it has applied.
    #[serde(default)]
    pub generation: i64,
    /// Its phase and route-table weight (bp).
    #[serde(default)]
    pub phase: String,
    /// The canary weight its route table holds, basis points.
    #[serde(default)]
    pub weight_bp: u16,
    /// The step it has applied (from 1; 0 outside a rollout).
    #[serde(default)]
    pub step: u32,
    /// Canary requests it served since it applied the current step.
    #[serde(default)]
    pub step_requests: u64,
    /// Its stable window.
    #[serde(default)]
    pub stable: WindowSummary,
    /// Its canary window.
    #[serde(default)]
    pub canary: WindowSummary,
}

/// One upstream's window: counts and the latency histogram's non-empty
/// buckets, so the leader can merge windows exactly.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowSummary {
    /// Requests completed in the window.
    #[serde(default)]
    pub requests: u64,
    /// Of those, errors.
    #[serde(default)]
    pub errors: u64,
    /// 95th percentile, ms.
    #[serde(default)]
    pub p95_ms: f64,
    /// `[bucket, count]` for every non-empty latency bucket.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<[u64; 2]>,
}

/// The leader's aggregate: what the fleet's judge looked at.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetAggregate {
    /// The member holding the lease.
    pub leader: String,
    /// Members that reported within three report intervals.
    pub members: u32,
    /// The highest epoch any member runs: an explicit raise takes the next
    /// one, so even a status restored from an old copy cannot strand the
    /// members in a future epoch.
    #[serde(default)]
    pub highest_member_epoch: u64,
    /// Canary requests the fleet served on the current step.
    #[serde(default)]
    pub step_requests: u64,
    /// Stable over the members' windows.
    pub stable: UpstreamAggregate,
    /// Canary over the members' windows.
    pub canary: UpstreamAggregate,
    /// When (RFC 3339).
    pub updated_at: String,
}

/// One upstream over every member's window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamAggregate {
    /// Requests.
    pub requests: u64,
    /// Errors.
    pub errors: u64,
    /// 95th percentile of the merged histograms, ms.
    pub p95_ms: f64,
}

/// The CRD as YAML, as `serin crd` prints it and `deploy/` ships it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = SerinRollout::crd();
    let yaml = serde_norway::to_string(&crd).expect("a CRD serialises");
    format!("# Generated by `serin crd` from control/src/fleet/crd.rs; do not edit.\n---\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_has_the_contract_names_status_and_printer_columns() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(SerinRollout::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "serinrollouts.serin.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["plural"], "serinrollouts");
        assert_eq!(crd["spec"]["names"]["kind"], "SerinRollout");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            columns,
            ["Phase", "Weight", "Step", "Members", "Reason", "Age"]
        );
        let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"];
        assert!(
            status["properties"]["members"].is_null(),
            "members live in a ConfigMap"
        );
        let judge =
            &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["judge"];
        assert!(judge["properties"]["max_error_rate"].is_object(), "{judge}");
    }

    #[test]
    fn shipped_crds_are_the_generated_one() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let generated = crd_yaml();
        for shipped in [
            "deploy/crds/serinrollouts.serin.dev.yaml",
            "deploy/helm/serin/crds/serinrollouts.serin.dev.yaml",
        ] {
            let text = std::fs::read_to_string(root.join(shipped)).unwrap_or_else(|e| {
                panic!("{shipped}: {e}; write it with `serin crd > {shipped}`")
            });
            assert!(
                text == generated,
                "{shipped} differs from the types; regenerate it with `serin crd > {shipped}`"
            );
        }
    }
}
