//! Fleet mode in `serin inject`: a pod annotated `serin.dev/fleet: NAME` joins the rollout
//! held in the SerinRollout NAME of its own namespace.
//!
//! Both front ends give the sidecar the same three env vars (the pod name and namespace
//! from the downward API, and `SERIN_FLEET` built from them). Only `serin inject -f` can
//! write more than the pod, so only it adds the ServiceAccount, Role and RoleBinding the
//! member needs; the webhook's users create those themselves (the Helm chart can).
//!
//! The Role must stay least-privilege: namespaced, no wildcard, every rule but `create`
//! (which Kubernetes cannot restrict by name) limited by `resourceNames` to the one
//! SerinRollout and its one Lease. `deploy/validate.py` checks the same rules.

use serde_json::{json, Map, Value};

/// Suffix of the ServiceAccount, Role and RoleBinding names: `<workload>-serin-fleet`.
pub const RBAC_SUFFIX: &str = "-serin-fleet";
/// The Lease a fleet elects its leader with is `serin-NAME`.
pub const LEASE_PREFIX: &str = "serin-";
/// The longest fleet name: the Lease name `serin-NAME` must fit 253 characters.
pub const MAX_NAME: usize = 253 - LEASE_PREFIX.len();
/// The longest object name Kubernetes accepts (DNS-1123 subdomain).
const MAX_OBJECT_NAME: usize = 253;

/// Checks that `name` can name a SerinRollout (a DNS-1123 subdomain) whose Lease name fits.
pub fn check_name(name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "is {} characters long; at most {MAX_NAME} fit, so that the Lease {LEASE_PREFIX}NAME stays within Kubernetes' 253",
            name.len()
        ));
    }
    if !name.split('.').all(label_ok) {
        return Err(
            "is not a valid SerinRollout name: use a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)"
                .to_owned(),
        );
    }
    Ok(())
}

/// The sidecar's fleet env. `SERIN_POD_NAMESPACE` comes before `SERIN_FLEET`, which
/// expands it (Kubernetes expands `$(VAR)` only for vars defined earlier in the list).
pub(crate) fn env(name: &str) -> [Value; 3] {
    let field = |path: &str| json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}});
    [
        json!({"name": "SERIN_FLEET_MEMBER", "valueFrom": field("metadata.name")}),
        json!({"name": "SERIN_POD_NAMESPACE", "valueFrom": field("metadata.namespace")}),
        json!({"name": "SERIN_FLEET", "value": format!("$(SERIN_POD_NAMESPACE)/{name}")}),
    ]
}

/// The Role's rules for fleet `name`: exactly what a member calls, on nothing else.
pub fn role_rules(name: &str) -> Value {
    let lease = format!("{LEASE_PREFIX}{name}");
    let members = format!("{LEASE_PREFIX}{name}-members");
    json!([
        {
            "apiGroups": ["serin.dev"],
            "resources": ["serinrollouts"],
            "resourceNames": [name],
            "verbs": ["get", "list", "watch", "patch"],
        },
        {
            "apiGroups": ["serin.dev"],
            "resources": ["serinrollouts/status"],
            "resourceNames": [name],
            "verbs": ["patch"],
        },
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "update"],
        },
        {
            // `create` carries no name to check; the member creates only serin-NAME.
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["create"],
        },
        {
            // The members' reports: one key each, read by the leader.
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [members],
            "verbs": ["get", "patch"],
        },
        {
            // The first report creates it (server-side apply); again no name to check.
            "apiGroups": [""],
            "resources": ["configmaps"],
            "verbs": ["create"],
        },
    ])
}

/// What injection found out about one fleet pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FleetPod {
    /// The SerinRollout's name.
    pub name: String,
    /// The pod template's `serviceAccountName` (or deprecated `serviceAccount`), if any.
    pub service_account: Option<String>,
    /// The pod template's `automountServiceAccountToken`, if set.
    pub automount: Option<bool>,
}

/// The service account a pod template names, if any.
pub(crate) fn named_account(spec: &Value) -> Option<String> {
    ["serviceAccountName", "serviceAccount"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_str))
        .find(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The objects `serin inject -f` writes for one fleet workload, and a note for the report.
pub(crate) struct Rbac {
    /// ServiceAccount (when created), Role, RoleBinding.
    pub objects: Vec<Value>,
    /// The account the pod template must name, when serin created it.
    pub created_account: Option<String>,
    /// For the report line.
    pub notes: Vec<String>,
}

/// Builds the RBAC of the fleet workload `workload` (its name) in `namespace` (`None`:
/// the manifest leaves it to `kubectl apply -n`).
pub(crate) fn rbac(
    workload: &str,
    namespace: Option<&str>,
    pod: &FleetPod,
) -> Result<Rbac, String> {
    let base = workload.trim_end_matches('-');
    if base.is_empty() {
        return Err(
            "it has no metadata.name to name the fleet's ServiceAccount, Role and RoleBinding after"
                .to_owned(),
        );
    }
    let rbac_name = format!("{base}{RBAC_SUFFIX}");
    if rbac_name.len() > MAX_OBJECT_NAME {
        return Err(format!(
            "its name is too long to name the fleet's Role {rbac_name:?} (Kubernetes allows {MAX_OBJECT_NAME} characters)"
        ));
    }
    let metadata = |name: &str| {
        let mut m = Map::new();
        m.insert("name".to_owned(), json!(name));
        if let Some(ns) = namespace {
            m.insert("namespace".to_owned(), json!(ns));
        }
        m.insert(
            "annotations".to_owned(),
            json!({super::annotations::FLEET: pod.name}),
        );
        Value::Object(m)
    };
    let shown = match namespace {
        Some(ns) => format!("{ns}/{rbac_name}"),
        None => rbac_name.clone(),
    };
    let mut objects = Vec::new();
    let mut notes = Vec::new();
    let (account, created_account) = match &pod.service_account {
        Some(existing) => {
            notes.push(format!(
                "fleet {}: Role and RoleBinding {shown} for its ServiceAccount {existing}",
                pod.name
            ));
            if existing == "default" {
                notes.push(
                    "warning: ServiceAccount \"default\" is shared by every pod of the namespace that names no other, and they all get the fleet's Role; give the pod template its own serviceAccountName"
                        .to_owned(),
                );
            }
            (existing.clone(), None)
        }
        None => {
            objects.push(json!({
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": metadata(&rbac_name),
            }));
            notes.push(format!(
                "fleet {}: ServiceAccount, Role and RoleBinding {shown}",
                pod.name
            ));
            (rbac_name.clone(), Some(rbac_name.clone()))
        }
    };
    objects.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(&rbac_name),
        "rules": role_rules(&pod.name),
    }));
    let mut subject = Map::new();
    subject.insert("kind".to_owned(), json!("ServiceAccount"));
    subject.insert("name".to_owned(), json!(account));
    if let Some(ns) = namespace {
        // Without one, a RoleBinding's ServiceAccount subject is in the binding's namespace.
        subject.insert("namespace".to_owned(), json!(ns));
    }
    objects.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(&rbac_name),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": rbac_name,
        },
        "subjects": [subject],
    }));
    Ok(Rbac {
        objects,
        created_account,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_1123_subdomains_whose_lease_fits() {
        for ok in ["web", "web-2", "a.b-c.d", "0", &"a".repeat(MAX_NAME)] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Web",
            "web_2",
            "-web",
            "web-",
            "a..b",
            ".a",
            "a.",
            "a/b",
            "wéb",
            &"a".repeat(MAX_NAME + 1),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn no_rule_has_a_wildcard_and_only_create_lacks_resource_names() {
        for rule in role_rules("web").as_array().unwrap() {
            let text = rule.to_string();
            assert!(!text.contains('*'), "{text}");
            let verbs = &rule["verbs"];
            if verbs == &json!(["create"]) {
                assert!(rule.get("resourceNames").is_none());
            } else {
                assert!(rule["resourceNames"]
                    .as_array()
                    .is_some_and(|n| n.len() == 1));
            }
        }
    }
}
