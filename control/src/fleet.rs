//! Fleet mode: many serins (the sidecars of one Deployment, or replicas of a
//! standalone proxy) share one rollout held in the Kubernetes API as a
//! [`crd::SerinRollout`]. Without `--fleet`, nothing here runs.
//!
//! - [`crd`]: the custom resource's types, the single source of the CRD.
//! - [`state`]: the fleet's transitions, pure functions over its status.
//! - [`member`]: what `serin run --fleet` adds to a serin: it watches the
//!   object and applies it, writes its local rollbacks to it, reports its
//!   windows to the ConfigMap `serin-NAME-members`, and, while it holds the
//!   fleet's Lease, judges the aggregate and moves the steps.
//! - [`ops`]: the operators' calls on the object (`serin ... --fleet`, and a
//!   member's own control API).

pub mod crd;
pub mod member;
pub mod ops;
pub mod state;

use std::fmt;
use std::str::FromStr;

use crate::config::{ConfigError, JudgeSettings, Overrides, RawJudge};
use crate::defaults::duration_text;

/// `NAMESPACE/NAME` of a `SerinRollout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetRef {
    /// The namespace.
    pub namespace: String,
    /// The object's name.
    pub name: String,
}

impl FromStr for FleetRef {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "--fleet must be NAMESPACE/NAME of a SerinRollout, e.g. shop/checkout (got {text:?})"
            )
        };
        let (namespace, name) = text.split_once('/').ok_or_else(bad)?;
        let dns = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && s.as_bytes()[0].is_ascii_alphanumeric()
                && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
        };
        if !dns(namespace) || !dns(name) || namespace.len() > 63 {
            return Err(bad());
        }
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for FleetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FleetRef {
    /// The fleet's Lease: `serin-NAME` in the same namespace.
    pub fn lease_name(&self) -> String {
        format!("serin-{}", self.name)
    }

    /// The ConfigMap the members report into, one key per member:
    /// `serin-NAME-members` in the same namespace.
    pub fn members_name(&self) -> String {
        format!("serin-{}-members", self.name)
    }
}

/// The judge as the spec's `judge` keys say, each key left out taken from
/// `base` (the member's own configuration). Errors name the key.
pub fn judge_settings(
    spec: &crd::JudgeSpec,
    base: &JudgeSettings,
) -> Result<JudgeSettings, ConfigError> {
    let p = &base.policy;
    let raw = RawJudge {
        window: Some(
            spec.window
                .clone()
                .unwrap_or_else(|| duration_text(p.window)),
        ),
        interval: Some(
            spec.interval
                .clone()
                .unwrap_or_else(|| duration_text(base.interval)),
        ),
        min_requests: Some(spec.min_requests.unwrap_or(p.min_requests)),
        max_error_rate: Some(spec.max_error_rate.unwrap_or(p.max_error_rate)),
        max_p95: Some(
            spec.max_p95
                .clone()
                .unwrap_or_else(|| duration_text(p.max_p95)),
        ),
        alpha: Some(spec.alpha.unwrap_or(p.alpha)),
        alpha_per_hour: Some(spec.alpha_per_hour.unwrap_or(p.alpha_per_hour)),
        min_latency_shift: Some(
            spec.min_latency_shift
                .or(spec.max_p95_ratio)
                .unwrap_or(p.min_latency_shift),
        ),
        max_p95_ratio: None,
        confidence: spec.confidence,
        min_error_rate_difference: Some(
            spec.min_error_rate_difference
                .unwrap_or(p.min_error_rate_difference),
        ),
        max_consecutive_errors: Some(
            spec.max_consecutive_errors
                .unwrap_or(p.max_consecutive_errors),
        ),
        // A fleet does not shadow (yet): the member's own value stands.
        max_shadow_mismatch_rate: Some(p.max_shadow_mismatch_rate),
    };
    crate::config::judge_settings(&raw, &Overrides::default())
}
