//! `serin inject`: adds the serin sidecar to Kubernetes manifests.
//!
//! The same logic serves two front ends: the CLI (`serin inject -f FILE`), which rewrites
//! multi-document YAML in the style of `linkerd inject`, and the mutating admission webhook
//! (`serin inject --serve`), which answers an AdmissionReview with a JSONPatch.
//!
//! A pod annotated `serin.dev/fleet: NAME` joins a fleet (see [`fleet`]): both front ends
//! give its sidecar the fleet env, and the CLI also writes the ServiceAccount, Role and
//! RoleBinding it needs, as documents before the workload's.
//!
//! This module must never inject when it cannot do so safely. It refuses with an error that
//! names the object and says what to change, and it leaves every object that did not opt in
//! semantically unchanged.

mod fleet;
mod patch;
mod serve;
mod sidecar;
mod yaml;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Map, Value};

pub use patch::diff as json_patch;
pub use serve::{review, serve, tls};
pub use sidecar::annotations;

/// The image the sidecar runs when `--image` is not given.
pub const DEFAULT_IMAGE: &str = concat!("serin:", env!("CARGO_PKG_VERSION"));

// === impl InjectArgs ===

/// Arguments of `serin inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Manifest to rewrite (multi-document YAML); `-` reads standard input.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        env = "SERIN_INJECT_FILENAME",
        required_unless_present = "serve"
    )]
    pub filename: Option<PathBuf>,

    /// Inject the outbound mode (client pods call serin on localhost) into objects that do
    /// not say `serin.dev/mode`. The default is inbound.
    #[arg(long, env = "SERIN_INJECT_OUTBOUND")]
    pub outbound: bool,

    /// Sidecar image.
    #[arg(long, env = "SERIN_INJECT_IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,

    /// Name of the Secret that holds the admin token (env `SERIN_ADMIN_TOKEN` of the sidecar).
    #[arg(
        long,
        env = "SERIN_INJECT_TOKEN_SECRET",
        default_value = "serin-admin-token"
    )]
    pub token_secret: String,

    /// Key of the admin token inside that Secret.
    #[arg(long, env = "SERIN_INJECT_TOKEN_KEY", default_value = "token")]
    pub token_key: String,

    /// Port the sidecar's proxy listens on.
    #[arg(long, env = "SERIN_INJECT_PROXY_PORT", default_value_t = 15080)]
    pub proxy_port: u16,

    /// Port the sidecar's control API listens on (probes and `serin status`).
    #[arg(long, env = "SERIN_INJECT_ADMIN_PORT", default_value_t = 15901)]
    pub admin_port: u16,

    /// Serve the mutating admission webhook instead of rewriting a file.
    #[arg(
        long,
        env = "SERIN_INJECT_SERVE",
        conflicts_with = "filename",
        requires_all = ["tls_cert", "tls_key"]
    )]
    pub serve: bool,

    /// PEM certificate chain of the webhook server.
    #[arg(long, env = "SERIN_INJECT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the webhook server.
    #[arg(long, env = "SERIN_INJECT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Address the webhook server listens on.
    #[arg(long, env = "SERIN_INJECT_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
}

/// Which way the sidecar faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serin takes over the pod's named port and splits between the local app (stable) and
    /// the canary Service.
    Inbound,
    /// The app calls serin on localhost, and serin splits between two Services.
    Outbound,
}

impl Mode {
    /// The name used in annotations and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Inbound => "inbound",
            Mode::Outbound => "outbound",
        }
    }
}

/// Validated settings of one injection, shared by the CLI and the webhook.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    /// Sidecar image. Default [`DEFAULT_IMAGE`].
    pub image: String,
    /// Mode of objects without a `serin.dev/mode` annotation. Default inbound.
    pub default_mode: Mode,
    /// Secret holding the admin token. Default `serin-admin-token`.
    pub token_secret: String,
    /// Key in that Secret. Default `token`.
    pub token_key: String,
    /// Proxy port. Default 15080.
    pub proxy_port: u16,
    /// Control API port. Default 15901.
    pub admin_port: u16,
}

impl Default for InjectOptions {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            default_mode: Mode::Inbound,
            token_secret: "serin-admin-token".to_owned(),
            token_key: "token".to_owned(),
            proxy_port: 15080,
            admin_port: 15901,
        }
    }
}

impl InjectOptions {
    /// Builds the options from the CLI arguments, checking what clap cannot.
    pub fn from_args(args: &InjectArgs) -> Result<Self, InjectError> {
        if args.proxy_port == args.admin_port || args.proxy_port == 0 || args.admin_port == 0 {
            return Err(InjectError::Usage(format!(
                "--proxy-port ({}) and --admin-port ({}) must be two different non-zero ports",
                args.proxy_port, args.admin_port
            )));
        }
        for (flag, value) in [
            ("--token-secret", &args.token_secret),
            ("--token-key", &args.token_key),
        ] {
            if value.is_empty() {
                return Err(InjectError::Usage(format!("{flag} must not be empty")));
            }
        }
        Ok(Self {
            image: args.image.clone(),
            default_mode: if args.outbound {
                Mode::Outbound
            } else {
                Mode::Inbound
            },
            token_secret: args.token_secret.clone(),
            token_key: args.token_key.clone(),
            proxy_port: args.proxy_port,
            admin_port: args.admin_port,
        })
    }
}

// === impl InjectError ===

/// Why an injection, or the webhook server, failed.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A flag combination that cannot work.
    #[error("{0}")]
    Usage(String),
    /// The manifest could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file (or `-`).
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The result could not be written.
    #[error("cannot write the result: {0}")]
    Write(#[source] io::Error),
    /// A YAML document is not valid YAML, or not a Kubernetes object.
    #[error("document {document}: not valid Kubernetes YAML: {reason}")]
    Yaml {
        /// 1-based document number.
        document: usize,
        /// What the parser said.
        reason: String,
    },
    /// An object that opted in cannot be injected safely.
    #[error("cannot inject {object}: {reason}")]
    Unsafe {
        /// The object, e.g. `Deployment shop/web (document 2)`.
        object: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The webhook's TLS files are unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The webhook server could not bind or serve.
    #[error("webhook server on {addr}: {source}")]
    Serve {
        /// The listen address.
        addr: String,
        /// The cause.
        source: io::Error,
    },
}

// === injection ===

/// What happened to one pod-bearing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added, in this mode.
    Injected(Mode),
    /// A container named `serin` is already there: nothing changed.
    AlreadyInjected,
    /// The object did not say `serin.dev/inject: enabled`: nothing changed.
    NotOptedIn,
}

/// One line of the report that `serin inject` prints to standard error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectReport {
    /// The object, e.g. `Deployment shop/web`.
    pub object: String,
    /// What happened to it.
    pub outcome: Outcome,
    /// What else was written for it, and warnings: e.g. the fleet's RBAC objects.
    pub notes: Vec<String>,
}

impl std::fmt::Display for ObjectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.outcome {
            Outcome::Injected(mode) => {
                write!(f, "{}: injected ({})", self.object, mode.as_str())?;
                self.notes.iter().try_for_each(|n| write!(f, "; {n}"))
            }
            Outcome::AlreadyInjected => write!(f, "{}: already injected, unchanged", self.object),
            Outcome::NotOptedIn => write!(
                f,
                "{}: skipped (no {}: enabled annotation)",
                self.object,
                annotations::INJECT
            ),
        }
    }
}

/// The rewritten manifests and what happened to each pod-bearing object.
#[derive(Debug, Clone)]
pub struct Injection {
    /// Multi-document YAML.
    pub output: String,
    /// One entry per Pod, workload, or list item holding a pod template.
    pub report: Vec<ObjectReport>,
}

/// Parses multi-document YAML into JSON values, dropping empty documents.
pub fn parse_documents(input: &str) -> Result<Vec<Value>, InjectError> {
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(input).enumerate() {
        let doc = Value::deserialize(de).map_err(|e| InjectError::Yaml {
            document: i + 1,
            reason: e.to_string(),
        })?;
        match doc {
            Value::Null => {}
            Value::Object(_) => docs.push(doc),
            other => {
                return Err(InjectError::Yaml {
                    document: i + 1,
                    reason: format!("expected a mapping (a Kubernetes object), found {other}"),
                })
            }
        }
    }
    Ok(docs)
}

/// Renders documents as multi-document YAML, quoting for both YAML 1.1 and 1.2 readers.
pub fn render_documents(docs: &[Value]) -> String {
    let mut out = String::new();
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&yaml::to_yaml(doc));
    }
    out
}

/// Injects the sidecar into every object of `input` that opts in. A fleet workload's RBAC
/// objects are written as documents just before the document that holds it, so that
/// `kubectl apply` creates them first.
pub fn inject_manifests(input: &str, opts: &InjectOptions) -> Result<Injection, InjectError> {
    let docs = parse_documents(input)?;
    let mut existing = HashMap::new();
    for doc in &docs {
        index_objects(doc, &mut existing);
    }
    let mut report = Vec::new();
    let numbered = docs.len() > 1;
    let mut out = Vec::with_capacity(docs.len());
    let mut written: HashMap<ObjectKey, (Value, String)> = HashMap::new();
    for (i, mut doc) in docs.into_iter().enumerate() {
        let context = numbered.then(|| format!("document {}", i + 1));
        let mut extra = FleetObjects::default();
        inject_object(
            &mut doc,
            opts,
            context.as_deref(),
            None,
            &mut report,
            Some(&mut extra),
        )?;
        for bound in extra.bound {
            check_bound_account(&bound, &existing)?;
        }
        for (object, owner) in extra.objects {
            let key = object_key(&object);
            let clash = |what: &str| InjectError::Unsafe {
                object: owner.clone(),
                reason: format!(
                    "{} {} {what}; rename or remove one of them",
                    key.kind,
                    key.shown()
                ),
            };
            if let Some(prev) = existing.get(&key) {
                if *prev == object {
                    continue;
                }
                return Err(clash(
                    "is already in the manifest, and differs from the one serin writes for this fleet",
                ));
            }
            if let Some((prev, first)) = written.get(&key) {
                if *prev == object {
                    continue;
                }
                return Err(clash(&format!(
                    "is also written for {first}, with other content"
                )));
            }
            written.insert(key, (object.clone(), owner));
            out.push(object);
        }
        out.push(doc);
    }
    Ok(Injection {
        output: render_documents(&out),
        report,
    })
}

/// What `serin inject -f` writes beside one document's fleet workloads.
#[derive(Debug, Default)]
pub(crate) struct FleetObjects {
    /// The RBAC objects, each with the workload it is for (for messages).
    objects: Vec<(Value, String)>,
    /// Pods bound to a service account they name, which the manifest may hold.
    bound: Vec<BoundAccount>,
}

/// A fleet pod that runs as a service account it names.
#[derive(Debug)]
struct BoundAccount {
    /// The workload, for messages.
    object: String,
    namespace: Option<String>,
    account: String,
    /// The pod spec's `automountServiceAccountToken`.
    automount: Option<bool>,
}

/// Identifies an object in a manifest: API group, kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ObjectKey {
    group: String,
    kind: String,
    namespace: Option<String>,
    name: String,
}

impl ObjectKey {
    fn shown(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

fn object_key(obj: &Value) -> ObjectKey {
    let text = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("");
    let group = text("/apiVersion")
        .rsplit_once('/')
        .map_or("", |(g, _)| g)
        .to_owned();
    ObjectKey {
        group,
        kind: text("/kind").to_owned(),
        namespace: Some(text("/metadata/namespace"))
            .filter(|n| !n.is_empty())
            .map(str::to_owned),
        name: text("/metadata/name").to_owned(),
    }
}

/// Indexes every named object of a document (and of its `List` items).
fn index_objects(doc: &Value, index: &mut HashMap<ObjectKey, Value>) {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    if let Some(items) = doc.get("items").and_then(Value::as_array) {
        if kind.ends_with("List") {
            items.iter().for_each(|item| index_objects(item, index));
            return;
        }
    }
    let key = object_key(doc);
    if !key.name.is_empty() {
        index.insert(key, doc.clone());
    }
}

/// Refuses a fleet pod whose service account, found in the manifest, turns the token off.
fn check_bound_account(
    bound: &BoundAccount,
    existing: &HashMap<ObjectKey, Value>,
) -> Result<(), InjectError> {
    let key = ObjectKey {
        group: String::new(),
        kind: "ServiceAccount".to_owned(),
        namespace: bound.namespace.clone(),
        name: bound.account.clone(),
    };
    let off = existing
        .get(&key)
        .and_then(|sa| sa.get("automountServiceAccountToken"))
        .and_then(Value::as_bool)
        == Some(false);
    if off && bound.automount != Some(true) {
        return Err(InjectError::Unsafe {
            object: bound.object.clone(),
            reason: format!(
                "the ServiceAccount {} it runs as sets automountServiceAccountToken: false, and a fleet member (annotation {}) needs the token to reach the Kubernetes API; set automountServiceAccountToken: true in the pod spec",
                key.shown(),
                annotations::FLEET
            ),
        });
    }
    Ok(())
}

/// Kinds whose pods run forever and carry a pod template at `spec.template`.
const WORKLOAD_KINDS: [&str; 4] = ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"];

/// Injects one object (recursing into `List` items), appending to `report`.
///
/// `context` is where the object sits (e.g. `document 2`), for error messages.
/// `namespace` names the object when its metadata has none (the webhook's request).
/// `fleet` collects the RBAC of fleet pods, and is `None` where only the pod can be
/// changed (the webhook): then a fleet pod gets only its env.
pub(crate) fn inject_object(
    obj: &mut Value,
    opts: &InjectOptions,
    context: Option<&str>,
    namespace: Option<&str>,
    report: &mut Vec<ObjectReport>,
    mut fleet: Option<&mut FleetObjects>,
) -> Result<(), InjectError> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let name = describe(obj, namespace);
    let located = match context {
        Some(c) => format!("{name} ({c})"),
        None => name.clone(),
    };
    if kind.ends_with("List") {
        if let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut) {
            for (i, item) in items.iter_mut().enumerate() {
                let inner = match context {
                    Some(c) => format!("{c}, {kind} item {}", i + 1),
                    None => format!("{kind} item {}", i + 1),
                };
                inject_object(
                    item,
                    opts,
                    Some(&inner),
                    namespace,
                    report,
                    fleet.as_deref_mut(),
                )?;
            }
            return Ok(());
        }
    }
    let (outcome, fleet_pod) = if kind == "Pod" {
        sidecar::inject_pod(obj, &Map::new(), opts, &located)?
    } else if WORKLOAD_KINDS.contains(&kind.as_str()) {
        let owner = obj
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        match obj.pointer_mut("/spec/template") {
            Some(template) if template.is_object() => {
                sidecar::inject_pod(template, &owner, opts, &located)?
            }
            _ if sidecar::opted_in(&owner) => {
                return Err(InjectError::Unsafe {
                    object: located,
                    reason: "it has no spec.template to inject into".to_owned(),
                })
            }
            _ => (Outcome::NotOptedIn, None),
        }
    } else {
        if asks_for_injection(obj) {
            let why = match kind.as_str() {
                "Job" | "CronJob" => "its pods must exit, and the serin sidecar never does",
                "" => "it has no kind",
                _ => "serin injects only Deployment, StatefulSet, DaemonSet, ReplicaSet, Pod and List",
            };
            return Err(InjectError::Unsafe {
                object: located,
                reason: format!(
                    "unsupported kind {kind:?}: {why}; remove the {} annotation from it",
                    annotations::INJECT
                ),
            });
        }
        return Ok(());
    };
    let mut notes = Vec::new();
    if let (Some(pod), Some(out)) = (fleet_pod, fleet) {
        let text = |p: &str| {
            obj.pointer(p)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let workload = text("/metadata/name")
            .or_else(|| text("/metadata/generateName"))
            .unwrap_or("");
        let ns = text("/metadata/namespace").or(namespace).map(str::to_owned);
        let rbac =
            fleet::rbac(workload, ns.as_deref(), &pod).map_err(|reason| InjectError::Unsafe {
                object: located.clone(),
                reason,
            })?;
        let template = if kind == "Pod" {
            Some(&mut *obj)
        } else {
            obj.pointer_mut("/spec/template")
        };
        if let Some(account) = &rbac.created_account {
            let spec = template
                .and_then(|t| t.get_mut("spec"))
                .and_then(Value::as_object_mut)
                .expect("injected: the pod spec is an object");
            spec.insert("serviceAccountName".to_owned(), json!(account));
        } else if let Some(account) = pod.service_account {
            out.bound.push(BoundAccount {
                object: located.clone(),
                namespace: ns,
                account,
                automount: pod.automount,
            });
        }
        out.objects
            .extend(rbac.objects.into_iter().map(|o| (o, located.clone())));
        notes = rbac.notes;
    }
    report.push(ObjectReport {
        object: name,
        outcome,
        notes,
    });
    Ok(())
}

/// Whether any annotation map of an object of an unknown kind opts in.
fn asks_for_injection(obj: &Value) -> bool {
    [
        "/metadata/annotations",
        "/spec/template/metadata/annotations",
        "/spec/jobTemplate/spec/template/metadata/annotations",
    ]
    .iter()
    .filter_map(|p| obj.pointer(p).and_then(Value::as_object))
    .any(sidecar::opted_in)
}

/// `Kind namespace/name`, for messages. Pods made by a controller have only `generateName`.
pub(crate) fn describe(obj: &Value, namespace: Option<&str>) -> String {
    let text = |p: &str| obj.pointer(p).and_then(Value::as_str);
    let kind = text("/kind").unwrap_or("object");
    let name = text("/metadata/name")
        .map(str::to_owned)
        .or_else(|| text("/metadata/generateName").map(|g| format!("{g}*")))
        .unwrap_or_else(|| "(unnamed)".to_owned());
    match text("/metadata/namespace").or(namespace) {
        Some(ns) if !ns.is_empty() => format!("{kind} {ns}/{name}"),
        _ => format!("{kind} {name}"),
    }
}

// === run ===

/// Runs `serin inject`: rewrites a manifest to standard output, or serves the webhook.
pub async fn run(args: InjectArgs) -> Result<(), InjectError> {
    let opts = InjectOptions::from_args(&args)?;
    if args.serve {
        return serve::run_server(&args, opts).await;
    }
    let stdin = io::stdin();
    let stdout = io::stdout();
    let stderr = io::stderr();
    inject_cli(&args, &opts, stdin.lock(), stdout.lock(), stderr.lock())
}

/// The CLI without the process: reads `args.filename` (or `stdin` for `-`), writes the
/// result to `out` and the report to `err`.
pub fn inject_cli(
    args: &InjectArgs,
    opts: &InjectOptions,
    mut stdin: impl Read,
    mut out: impl Write,
    mut err: impl Write,
) -> Result<(), InjectError> {
    let path = args.filename.clone().ok_or_else(|| {
        InjectError::Usage("give a manifest with -f FILE (or -f - for standard input)".to_owned())
    })?;
    let shown = path.display().to_string();
    let mut input = String::new();
    let read = if shown == "-" {
        stdin.read_to_string(&mut input).map(drop)
    } else {
        std::fs::read_to_string(&path).map(|s| input = s)
    };
    read.map_err(|source| InjectError::Read {
        path: shown,
        source,
    })?;
    let injection = inject_manifests(&input, opts)?;
    out.write_all(injection.output.as_bytes())
        .and_then(|()| out.flush())
        .map_err(InjectError::Write)?;
    for line in &injection.report {
        // The report is advice; a closed stderr must not fail the rewrite.
        let _ = writeln!(err, "{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
