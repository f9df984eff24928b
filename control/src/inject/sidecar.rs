//! Adds the serin container to one pod template (or Pod), with the fleet env when the pod
//! asks for a fleet.
//!
//! Everything is checked before anything is changed, so a refusal leaves the object as it
//! was. It must never rename a port, or add a container or volume, that could clash with
//! what the pod already has.

use serde_json::{json, Map, Value};

use super::fleet::{self, FleetPod};
use super::{InjectError, InjectOptions, Mode, Outcome};

/// The annotations serin reads (on the pod template, or on the workload itself).
pub mod annotations {
    /// `enabled` opts the pod in; `disabled` (or no annotation) leaves it alone.
    pub const INJECT: &str = "serin.dev/inject";
    /// `inbound` (default) or `outbound`.
    pub const MODE: &str = "serin.dev/mode";
    /// The canary upstream URL, e.g. `http://myapp-canary.ns.svc:80`. Required.
    pub const CANARY: &str = "serin.dev/canary";
    /// The stable upstream URL. Outbound only (inbound uses the app on 127.0.0.1).
    pub const STABLE: &str = "serin.dev/stable";
    /// Inbound: the name of the app's port that serin takes over. Default `http`.
    pub const PORT: &str = "serin.dev/port";
    /// Initial canary weight in percent, e.g. `5` or `12.5`.
    pub const CANARY_WEIGHT: &str = "serin.dev/canary-weight";
    /// Judge: highest canary error rate, a ratio in 0..1 (`0.05` is 5%).
    pub const MAX_ERROR_RATE: &str = "serin.dev/max-error-rate";
    /// Judge: highest canary p95 latency, e.g. `800ms`.
    pub const MAX_P95: &str = "serin.dev/max-p95";
    /// `stdout` turns the sidecar's access log on: a JSON line per request
    /// on the container's standard output, where the node's log collector
    /// reads it. `off` (or no annotation): no access log.
    pub const ACCESS_LOG: &str = "serin.dev/access-log";
    /// Sidecar CPU request. Default `50m`.
    pub const CPU_REQUEST: &str = "serin.dev/proxy-cpu-request";
    /// Sidecar CPU limit. Default `1`.
    pub const CPU_LIMIT: &str = "serin.dev/proxy-cpu-limit";
    /// Sidecar memory request. Default `32Mi`.
    pub const MEMORY_REQUEST: &str = "serin.dev/proxy-memory-request";
    /// Sidecar memory limit. Default `128Mi`.
    pub const MEMORY_LIMIT: &str = "serin.dev/proxy-memory-limit";
    /// Fleet mode: the name of the SerinRollout in the pod's namespace that the sidecar
    /// joins. Absent: the sidecar keeps its own rollout.
    pub const FLEET: &str = "serin.dev/fleet";
    /// Written by serin on injected pods: the mode.
    pub const INJECTED: &str = "serin.dev/injected";
}

/// The sidecar container's name; its presence means "already injected".
pub const CONTAINER_NAME: &str = "serin";
/// The emptyDir volume that holds `--state-dir`.
pub const STATE_VOLUME: &str = "serin-state";
/// Where that volume is mounted.
pub const STATE_DIR: &str = "/var/run/serin";
/// The name of the sidecar's control API port.
pub const ADMIN_PORT_NAME: &str = "serin-admin";
/// Prefix of the app's renamed port (`http` becomes `app-http`).
pub const APP_PORT_PREFIX: &str = "app-";
/// The UID and GID the sidecar runs as (distroless `nonroot`).
const SIDECAR_UID: u32 = 65532;

/// Whether an annotation map says `serin.dev/inject: enabled`.
pub(crate) fn opted_in(annotations: &Map<String, Value>) -> bool {
    annotations.get(annotations::INJECT).and_then(Value::as_str) == Some("enabled")
}

/// The serin annotations of a pod: the workload's, overridden by the pod template's.
struct Settings {
    values: Map<String, Value>,
    object: String,
}

impl Settings {
    fn new(owner: &Map<String, Value>, pod: Option<&Map<String, Value>>, object: &str) -> Self {
        let mut values = Map::new();
        for source in [Some(owner), pod].into_iter().flatten() {
            for (k, v) in source {
                if k.starts_with("serin.dev/") {
                    values.insert(k.clone(), v.clone());
                }
            }
        }
        Self {
            values,
            object: object.to_owned(),
        }
    }

    fn unsafe_(&self, reason: String) -> InjectError {
        InjectError::Unsafe {
            object: self.object.clone(),
            reason,
        }
    }

    /// The annotation as a trimmed string; a non-string value is an error.
    fn get(&self, key: &str) -> Result<Option<&str>, InjectError> {
        match self.values.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim())),
            Some(other) => Err(self.unsafe_(format!(
                "annotation {key} must be a string (got {other}); quote it in YAML"
            ))),
        }
    }

    fn bad(&self, key: &str, value: &str, why: &str) -> InjectError {
        self.unsafe_(format!("annotation {key}: {value:?} {why}"))
    }

    fn url(&self, key: &str) -> Result<Option<String>, InjectError> {
        let Some(v) = self.get(key)? else {
            return Ok(None);
        };
        let rest = v
            .strip_prefix("http://")
            .or_else(|| v.strip_prefix("https://"));
        match rest {
            Some(host)
                if !host.is_empty()
                    && !host.starts_with('/')
                    && !v.contains(char::is_whitespace) =>
            {
                Ok(Some(v.to_owned()))
            }
            _ => Err(self.bad(key, v, "is not an http:// or https:// URL with a host")),
        }
    }

    fn number(&self, key: &str, max: f64, hint: &str) -> Result<Option<String>, InjectError> {
        let Some(v) = self.get(key)? else {
            return Ok(None);
        };
        match v.parse::<f64>() {
            Ok(x) if (0.0..=max).contains(&x) => Ok(Some(v.to_owned())),
            _ => Err(self.bad(
                key,
                v,
                &format!("must be a number between 0 and {max}{hint}"),
            )),
        }
    }

    fn duration(&self, key: &str) -> Result<Option<String>, InjectError> {
        let Some(v) = self.get(key)? else {
            return Ok(None);
        };
        let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &v[digits.len()..];
        let ok = matches!(unit, "ms" | "s" | "m") && digits.parse::<f64>().is_ok_and(|x| x > 0.0);
        if ok {
            Ok(Some(v.to_owned()))
        } else {
            Err(self.bad(key, v, "must be a positive duration such as 800ms or 1.5s"))
        }
    }

    fn quantity(&self, key: &str, default: &str) -> Result<String, InjectError> {
        let Some(v) = self.get(key)? else {
            return Ok(default.to_owned());
        };
        let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &v[digits.len()..];
        let units = ["", "m", "k", "M", "G", "Ki", "Mi", "Gi"];
        if units.contains(&unit) && digits.parse::<f64>().is_ok_and(|x| x > 0.0) {
            Ok(v.to_owned())
        } else {
            Err(self.bad(key, v, "is not a Kubernetes quantity such as 100m, 1, 64Mi"))
        }
    }
}

/// Where a port is declared.
struct PortRef {
    container: String,
    name: Option<String>,
    number: Option<i64>,
}

fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    ["containers", "initContainers", "ephemeralContainers"]
        .into_iter()
        .filter_map(|k| spec.get(k).and_then(Value::as_array))
        .flatten()
}

fn all_ports(spec: &Value) -> Vec<PortRef> {
    let mut out = Vec::new();
    for c in containers(spec) {
        let container = c
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        for p in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push(PortRef {
                container: container.clone(),
                name: p.get("name").and_then(Value::as_str).map(str::to_owned),
                number: p.get("containerPort").and_then(Value::as_i64),
            });
        }
    }
    out
}

/// Injects into `template` (an object with `metadata` and `spec`). A fleet pod that was
/// injected also gets what the caller needs to give it its RBAC.
pub(crate) fn inject_pod(
    template: &mut Value,
    owner: &Map<String, Value>,
    opts: &InjectOptions,
    object: &str,
) -> Result<(Outcome, Option<FleetPod>), InjectError> {
    let pod_annotations = template
        .pointer("/metadata/annotations")
        .and_then(Value::as_object);
    let s = Settings::new(owner, pod_annotations, object);
    match s.get(annotations::INJECT)? {
        Some("enabled") => {}
        None | Some("disabled") => return Ok((Outcome::NotOptedIn, None)),
        Some(other) => {
            return Err(s.bad(annotations::INJECT, other, "must be enabled or disabled"))
        }
    }
    let Some(spec) = template.get("spec").filter(|s| s.is_object()) else {
        return Err(s.unsafe_("it has no pod spec".to_owned()));
    };
    let app_containers = spec.get("containers").and_then(Value::as_array);
    if app_containers.is_none_or(Vec::is_empty) {
        return Err(s.unsafe_("its pod spec has no containers".to_owned()));
    }
    if containers(spec).any(|c| c.get("name").and_then(Value::as_str) == Some(CONTAINER_NAME)) {
        return Ok((Outcome::AlreadyInjected, None));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Err(s.unsafe_(
            "it uses hostNetwork, so serin's ports would be the node's; run serin standalone instead (deploy/helm/serin)"
                .to_owned(),
        ));
    }

    let mode = match s.get(annotations::MODE)? {
        None => opts.default_mode,
        Some("inbound") => Mode::Inbound,
        Some("outbound") => Mode::Outbound,
        Some(other) => return Err(s.bad(annotations::MODE, other, "must be inbound or outbound")),
    };
    let canary = s.url(annotations::CANARY)?.ok_or_else(|| {
        s.unsafe_(format!(
            "annotation {} is missing; set it to the canary Service's URL, e.g. http://myapp-canary.myns.svc:80",
            annotations::CANARY
        ))
    })?;
    let weight = s.number(annotations::CANARY_WEIGHT, 100.0, " (percent)")?;
    let max_error_rate = s.number(annotations::MAX_ERROR_RATE, 1.0, "; write 0.05 for 5%")?;
    let max_p95 = s.duration(annotations::MAX_P95)?;
    let access_log = match s.get(annotations::ACCESS_LOG)? {
        None | Some("off") => None,
        Some("stdout") => Some("stdout".to_owned()),
        Some(other) => {
            return Err(s.bad(
                annotations::ACCESS_LOG,
                other,
                "must be stdout or off (a sidecar's access log goes to the container's log)",
            ))
        }
    };
    let fleet = match s.get(annotations::FLEET)? {
        None => None,
        Some(name) => {
            fleet::check_name(name).map_err(|why| s.bad(annotations::FLEET, name, &why))?;
            let automount = spec
                .get("automountServiceAccountToken")
                .and_then(Value::as_bool);
            if automount == Some(false) {
                return Err(s.unsafe_(format!(
                    "annotation {}: a fleet member reads and writes its rollout in the Kubernetes API with the pod's service-account token, and the pod spec sets automountServiceAccountToken: false; remove that line (the token's Role reaches only SerinRollout {name} and Lease {}{name})",
                    annotations::FLEET,
                    fleet::LEASE_PREFIX
                )));
            }
            Some(FleetPod {
                name: name.to_owned(),
                service_account: fleet::named_account(spec),
                automount,
            })
        }
    };
    let resources = json!({
        "requests": {
            "cpu": s.quantity(annotations::CPU_REQUEST, "50m")?,
            "memory": s.quantity(annotations::MEMORY_REQUEST, "32Mi")?,
        },
        "limits": {
            "cpu": s.quantity(annotations::CPU_LIMIT, "1")?,
            "memory": s.quantity(annotations::MEMORY_LIMIT, "128Mi")?,
        },
    });

    let ports = all_ports(spec);
    for p in &ports {
        if let Some(n) = p.number {
            if n == i64::from(opts.proxy_port) || n == i64::from(opts.admin_port) {
                return Err(s.unsafe_(format!(
                    "port clash: container {:?} already uses port {n}, which serin needs; pass --proxy-port/--admin-port with free ports",
                    p.container
                )));
            }
        }
        if p.name.as_deref() == Some(ADMIN_PORT_NAME) {
            return Err(s.unsafe_(format!(
                "port name clash: container {:?} already has a port named {ADMIN_PORT_NAME:?}",
                p.container
            )));
        }
    }
    if let Some(v) = spec.get("volumes").and_then(Value::as_array) {
        if v.iter()
            .any(|v| v.get("name").and_then(Value::as_str) == Some(STATE_VOLUME))
        {
            return Err(s.unsafe_(format!(
                "volume name clash: the pod already has a volume named {STATE_VOLUME:?}"
            )));
        }
    }

    // Inbound: which port serin takes over, and the app's new name for it.
    let takeover = match mode {
        Mode::Outbound => None,
        Mode::Inbound => {
            let name = s.get(annotations::PORT)?.unwrap_or("http").to_owned();
            let owners: Vec<&PortRef> = ports
                .iter()
                .filter(|p| p.name.as_deref() == Some(&name))
                .collect();
            let port = match owners.as_slice() {
                [one] => one,
                [] => {
                    let found: Vec<String> = ports
                        .iter()
                        .map(|p| match (&p.name, p.number) {
                            (Some(n), Some(num)) => format!("{n}={num}"),
                            (None, Some(num)) => format!("{num} (unnamed)"),
                            (n, None) => n.clone().unwrap_or_default(),
                        })
                        .collect();
                    return Err(s.unsafe_(format!(
                        "no named port: no container port is named {name:?} (ports: [{}]); name the app's serving port {name:?}, or set {} to its name",
                        found.join(", "),
                        annotations::PORT
                    )));
                }
                _ => {
                    return Err(s.unsafe_(format!(
                        "port name clash: more than one container port is named {name:?}"
                    )))
                }
            };
            let in_app = app_containers
                .into_iter()
                .flatten()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(port.container.as_str()));
            if !in_app {
                return Err(s.unsafe_(format!(
                    "port {name:?} belongs to container {:?}, which is not a regular container",
                    port.container
                )));
            }
            let Some(number) = port.number else {
                return Err(s.unsafe_(format!("port {name:?} has no containerPort")));
            };
            let renamed = format!("{APP_PORT_PREFIX}{name}");
            if renamed.len() > 15 {
                return Err(s.unsafe_(format!(
                    "port name {name:?} is too long to rename to {renamed:?} (Kubernetes allows 15 characters); shorten it"
                )));
            }
            if let Some(clash) = ports.iter().find(|p| p.name.as_deref() == Some(&renamed)) {
                return Err(s.unsafe_(format!(
                    "port name clash: container {:?} already has a port named {renamed:?}, the name serin gives the app's {name:?} port",
                    clash.container
                )));
            }
            Some((name, renamed, port.container.clone(), number))
        }
    };
    let stable = match &takeover {
        Some((_, _, _, number)) => format!("http://127.0.0.1:{number}"),
        None => s.url(annotations::STABLE)?.ok_or_else(|| {
            s.unsafe_(format!(
                "outbound mode needs annotation {} set to the stable Service's URL",
                annotations::STABLE
            ))
        })?,
    };

    // Checks are done: from here on, only changes.
    let listen_host = if mode == Mode::Inbound {
        "0.0.0.0"
    } else {
        "127.0.0.1"
    };
    let args = vec![
        "run".to_owned(),
        "--listen".to_owned(),
        format!("{listen_host}:{}", opts.proxy_port),
        "--stable".to_owned(),
        stable,
        "--canary".to_owned(),
        canary,
        "--admin".to_owned(),
        format!("0.0.0.0:{}", opts.admin_port),
        "--state-dir".to_owned(),
        STATE_DIR.to_owned(),
    ];
    let mut env = vec![json!({
        "name": "SERIN_ADMIN_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": opts.token_secret, "key": opts.token_key}},
    })];
    for (name, value) in [
        ("SERIN_CANARY_WEIGHT", weight),
        ("SERIN_JUDGE_MAX_ERROR_RATE", max_error_rate),
        ("SERIN_JUDGE_MAX_P95", max_p95),
        ("SERIN_ACCESS_LOG", access_log),
    ] {
        if let Some(value) = value {
            env.push(json!({"name": name, "value": value}));
        }
    }
    if let Some(f) = &fleet {
        env.extend(fleet::env(&f.name));
    }
    let mut container_ports = Vec::new();
    if mode == Mode::Inbound {
        container_ports
            .push(json!({"name": "http", "containerPort": opts.proxy_port, "protocol": "TCP"}));
    }
    container_ports.push(
        json!({"name": ADMIN_PORT_NAME, "containerPort": opts.admin_port, "protocol": "TCP"}),
    );
    let sidecar = json!({
        "name": CONTAINER_NAME,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": env,
        "ports": container_ports,
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": ADMIN_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": ADMIN_PORT_NAME},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": STATE_VOLUME, "mountPath": STATE_DIR}],
    });

    let obj = template
        .as_object_mut()
        .expect("checked: template is an object");
    let metadata = obj.entry("metadata").or_insert_with(|| json!({}));
    if !metadata.is_object() {
        *metadata = json!({});
    }
    let annotations_map = metadata
        .as_object_mut()
        .expect("just made an object")
        .entry("annotations")
        .or_insert_with(|| json!({}));
    if !annotations_map.is_object() {
        *annotations_map = json!({});
    }
    annotations_map
        .as_object_mut()
        .expect("just made an object")
        .insert(annotations::INJECTED.to_owned(), json!(mode.as_str()));

    let spec = obj
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .expect("checked: spec is an object");
    if let Some((name, renamed, container, _)) = &takeover {
        let app = spec
            .get_mut("containers")
            .and_then(Value::as_array_mut)
            .and_then(|cs| {
                cs.iter_mut()
                    .find(|c| c.get("name").and_then(Value::as_str) == Some(container.as_str()))
            })
            .expect("checked: the port's container is a regular container");
        rename_port(app, name, renamed);
    }
    spec.get_mut("containers")
        .and_then(Value::as_array_mut)
        .expect("checked: containers is a list")
        .push(sidecar);
    let volume = json!({"name": STATE_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}});
    match spec.get_mut("volumes").and_then(Value::as_array_mut) {
        Some(volumes) => volumes.push(volume),
        None => {
            spec.insert("volumes".to_owned(), json!([volume]));
        }
    }
    Ok((Outcome::Injected(mode), fleet))
}

/// Renames the app container's port, and every probe or hook that names it.
fn rename_port(container: &mut Value, from: &str, to: &str) {
    for port in container
        .get_mut("ports")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if port.get("name").and_then(Value::as_str) == Some(from) {
            port["name"] = json!(to);
        }
    }
    let handlers = [
        "/livenessProbe",
        "/readinessProbe",
        "/startupProbe",
        "/lifecycle/postStart",
        "/lifecycle/preStop",
    ];
    for handler in handlers {
        for action in ["httpGet", "tcpSocket"] {
            if let Some(port) = container.pointer_mut(&format!("{handler}/{action}/port")) {
                if port.as_str() == Some(from) {
                    *port = json!(to);
                }
            }
        }
    }
}
