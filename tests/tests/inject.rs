//! `serin inject`, end to end: golden files over a corpus of realistic manifests, round-trip
//! idempotence, the CLI entry point, fleet mode (env and least-privilege RBAC), and the
//! admission webhook over real HTTPS.
//!
//! Golden files: `tests/fixtures/inject/NAME.yaml` is the input; `NAME.golden.yaml` is the
//! expected output, or `NAME.error.txt` the expected error. `SERIN_BLESS=1` rewrites them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use serin_control::inject::{self, InjectArgs, InjectOptions, Mode, Outcome};
use serin_tests::eventually;
use tokio::net::{TcpListener, TcpStream};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/inject")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn bless() -> bool {
    std::env::var_os("SERIN_BLESS").is_some()
}

/// Compares `actual` with the file, or rewrites the file when blessing.
fn check_golden(path: &Path, actual: &str) {
    if bless() {
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with SERIN_BLESS=1 to create it)",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} is out of date (SERIN_BLESS=1 rewrites it)",
        path.display()
    );
}

fn inputs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.ends_with(".yaml") && !name.ends_with(".golden.yaml")
        })
        .collect();
    v.sort();
    v
}

fn golden_of(input: &Path) -> PathBuf {
    input.with_extension("golden.yaml")
}

#[test]
fn golden_corpus() {
    let opts = InjectOptions::default();
    let mut oks = 0;
    let mut errors = 0;
    for input in inputs() {
        let text = std::fs::read_to_string(&input).unwrap();
        let is_error_case = input
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("err-");
        match inject::inject_manifests(&text, &opts) {
            Ok(out) => {
                assert!(
                    !is_error_case,
                    "{} should have been refused",
                    input.display()
                );
                check_golden(&golden_of(&input), &out.output);
                oks += 1;
            }
            Err(e) => {
                assert!(is_error_case, "{}: {e}", input.display());
                check_golden(&input.with_extension("error.txt"), &format!("{e}\n"));
                errors += 1;
            }
        }
    }
    assert!(
        oks >= 8 && errors >= 5,
        "corpus too small: {oks} ok, {errors} errors"
    );
}

#[test]
fn refusals_name_the_object_and_the_problem() {
    let cases = [
        (
            "err-no-named-port",
            "Deployment shop/billing",
            "no named port",
        ),
        (
            "err-port-name-clash",
            "Deployment shop/billing",
            "port name clash",
        ),
        (
            "err-port-number-clash",
            "Deployment shop/billing",
            "port clash",
        ),
        (
            "err-bad-annotation",
            "Deployment shop/billing",
            "write 0.05 for 5%",
        ),
        (
            "err-unknown-kind",
            "CronJob shop/nightly (document 2)",
            "unsupported kind",
        ),
        (
            "err-fleet-name",
            "Deployment shop/checkout",
            "annotation serin.dev/fleet: \"Checkout_V2\" is not a valid SerinRollout name",
        ),
        (
            "err-fleet-automount",
            "Deployment shop/checkout",
            "sets automountServiceAccountToken: false",
        ),
        (
            "err-fleet-account-automount",
            "Deployment bank/ledger (document 2)",
            "the ServiceAccount bank/ledger it runs as sets automountServiceAccountToken: false",
        ),
    ];
    for (name, object, problem) in cases {
        let text = std::fs::read_to_string(fixtures().join(format!("{name}.yaml"))).unwrap();
        let e = inject::inject_manifests(&text, &InjectOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(object) && e.contains(problem), "{name}: {e}");
    }
}

#[test]
fn injecting_the_output_again_changes_nothing() {
    for input in inputs().iter().filter(|p| golden_of(p).exists()) {
        let golden = std::fs::read_to_string(golden_of(input)).unwrap();
        let again = inject::inject_manifests(&golden, &InjectOptions::default()).unwrap();
        assert_eq!(
            again.output,
            golden,
            "{} is not a fixed point",
            input.display()
        );
        assert!(
            again
                .report
                .iter()
                .all(|r| r.outcome != Outcome::Injected(Mode::Inbound)
                    && r.outcome != Outcome::Injected(Mode::Outbound)),
            "{}: {:?}",
            input.display(),
            again.report
        );
    }
}

/// Whether `doc` is a fleet's RBAC object that `serin inject -f` wrote.
fn written_for_a_fleet(doc: &Value) -> bool {
    ["ServiceAccount", "Role", "RoleBinding"].contains(&doc["kind"].as_str().unwrap_or(""))
        && doc
            .pointer("/metadata/annotations/serin.dev~1fleet")
            .is_some()
}

/// Undoes exactly what injection adds, so the rest can be compared with the input (the
/// fleets' RBAC documents are dropped by the caller).
fn uninject(doc: &mut Value) {
    if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
        items.iter_mut().for_each(uninject);
    }
    let template = if doc["kind"] == "Pod" {
        Some(doc)
    } else {
        doc.pointer_mut("/spec/template")
    };
    let Some(template) = template else { return };
    let Some(annotations) = template
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    if annotations.remove("serin.dev/injected").is_none() {
        return;
    }
    if annotations.is_empty() {
        template["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
    }
    let spec = template["spec"].as_object_mut().unwrap();
    let containers = spec["containers"].as_array_mut().unwrap();
    let serin = containers.pop().unwrap();
    assert_eq!(serin["name"], "serin");
    let in_fleet = serin["env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "SERIN_FLEET");
    let account = spec.get("serviceAccountName").and_then(Value::as_str);
    if in_fleet && account.is_some_and(|a| a.ends_with("-serin-fleet")) {
        spec.remove("serviceAccountName");
    }
    let containers = spec["containers"].as_array_mut().unwrap();
    let renamed = |v: &mut Value| {
        if let Some(name) = v.as_str().and_then(|s| s.strip_prefix("app-")) {
            *v = json!(name);
        }
    };
    for c in containers.iter_mut() {
        for p in c
            .get_mut("ports")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            renamed(&mut p["name"]);
        }
        for ptr in [
            "/livenessProbe/httpGet/port",
            "/readinessProbe/httpGet/port",
            "/startupProbe/tcpSocket/port",
            "/lifecycle/preStop/httpGet/port",
        ] {
            if let Some(v) = c.pointer_mut(ptr) {
                renamed(v);
            }
        }
    }
    let volumes = spec["volumes"].as_array_mut().unwrap();
    assert_eq!(volumes.pop().unwrap()["name"], "serin-state");
    if volumes.is_empty() {
        spec.remove("volumes");
    }
}

#[test]
fn everything_but_the_sidecar_is_left_equivalent() {
    for input in inputs().iter().filter(|p| golden_of(p).exists()) {
        let mut before = inject::parse_documents(&std::fs::read_to_string(input).unwrap()).unwrap();
        before.iter_mut().for_each(uninject);
        let mut after =
            inject::parse_documents(&std::fs::read_to_string(golden_of(input)).unwrap()).unwrap();
        after.retain(|d| !written_for_a_fleet(d));
        after.iter_mut().for_each(uninject);
        assert_eq!(after, before, "{}", input.display());
    }
}

#[test]
fn the_deploy_example_is_the_injected_app() {
    let app = repo().join("deploy/examples/app.yaml");
    let text = std::fs::read_to_string(&app).unwrap();
    let out = inject::inject_manifests(&text, &InjectOptions::default()).unwrap();
    assert_eq!(
        out.report
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Injected(_)))
            .count(),
        1
    );
    check_golden(
        &repo().join("deploy/examples/app-injected.yaml"),
        &out.output,
    );
}

#[test]
fn the_fleet_example_is_the_injected_fleet() {
    let text = std::fs::read_to_string(repo().join("deploy/examples/fleet.yaml")).unwrap();
    let out = inject::inject_manifests(&text, &InjectOptions::default()).unwrap();
    assert_eq!(
        out.report.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["Deployment demo/hello: injected (inbound); fleet hello: ServiceAccount, Role and RoleBinding demo/hello-serin-fleet"]
    );
    check_golden(
        &repo().join("deploy/examples/fleet-injected.yaml"),
        &out.output,
    );
    // The SerinRollout example is the fleet the Deployment names.
    let rollout =
        std::fs::read_to_string(repo().join("deploy/examples/serinrollout.yaml")).unwrap();
    let rollout = &inject::parse_documents(&rollout).unwrap()[0];
    assert_eq!(rollout["kind"], "SerinRollout");
    assert_eq!(rollout["metadata"]["name"], "hello");
    assert_eq!(rollout["metadata"]["namespace"], "demo");
}

// === fleet mode ===

fn inject_fixture(name: &str) -> (Vec<Value>, Vec<String>) {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    let out = inject::inject_manifests(&text, &InjectOptions::default()).unwrap();
    (
        inject::parse_documents(&out.output).unwrap(),
        out.report.iter().map(ToString::to_string).collect(),
    )
}

fn sidecar_env(pod_spec: &Value) -> Vec<Value> {
    let containers = pod_spec["containers"].as_array().unwrap();
    let serin = containers.iter().find(|c| c["name"] == "serin").unwrap();
    serin["env"].as_array().unwrap().clone()
}

/// The Role every fleet member needs, for fleet `name`: nothing more.
fn contract_rules(name: &str) -> Value {
    json!([
        {"apiGroups": ["serin.dev"], "resources": ["serinrollouts"],
         "resourceNames": [name], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": ["serin.dev"], "resources": ["serinrollouts/status"],
         "resourceNames": [name], "verbs": ["patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": [format!("serin-{name}")], "verbs": ["get", "update"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["configmaps"],
         "resourceNames": [format!("serin-{name}-members")], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    ])
}

/// Least privilege, whatever the rules: namespaced kinds, no wildcard, names on every rule
/// whose verb Kubernetes can restrict by name.
fn assert_least_privilege(role: &Value) {
    assert_eq!(role["kind"], "Role", "never a ClusterRole");
    for rule in role["rules"].as_array().unwrap() {
        for key in ["apiGroups", "resources", "verbs", "resourceNames"] {
            for v in rule
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                assert!(!v.as_str().unwrap().contains('*'), "wildcard in {rule}");
            }
        }
        if rule["verbs"] != json!(["create"]) {
            assert!(
                rule["resourceNames"]
                    .as_array()
                    .is_some_and(|n| !n.is_empty()),
                "no resourceNames: {rule}"
            );
        }
    }
}

#[test]
fn fleet_pods_get_the_downward_api_env_in_expansion_order() {
    let (docs, _) = inject_fixture("fleet.yaml");
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let env = sidecar_env(&deployment["spec"]["template"]["spec"]);
    let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "SERIN_ADMIN_TOKEN",
            "SERIN_JUDGE_MAX_ERROR_RATE",
            "SERIN_FLEET_MEMBER",
            "SERIN_POD_NAMESPACE",
            "SERIN_FLEET"
        ],
        "SERIN_POD_NAMESPACE must come before SERIN_FLEET, which expands it"
    );
    assert_eq!(
        env[2..],
        [
            json!({"name": "SERIN_FLEET_MEMBER",
                   "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}),
            json!({"name": "SERIN_POD_NAMESPACE",
                   "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}}),
            json!({"name": "SERIN_FLEET", "value": "$(SERIN_POD_NAMESPACE)/checkout"}),
        ]
    );
    // Pods that do not name a fleet get none of it.
    let (docs, _) = inject_fixture("deployment.yaml");
    let env = sidecar_env(&docs[0]["spec"]["template"]["spec"]);
    assert!(env
        .iter()
        .all(|e| !e["name"].as_str().unwrap().starts_with("SERIN_FLEET")));
}

#[test]
fn fleet_rbac_is_exactly_what_a_member_calls_for_a_created_account() {
    let (docs, report) = inject_fixture("fleet.yaml");
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "Deployment",
            "Service"
        ],
        "the RBAC comes first, so that kubectl apply creates it before the pods"
    );
    assert_eq!(
        report,
        ["Deployment shop/checkout: injected (inbound); fleet checkout: ServiceAccount, Role and RoleBinding shop/checkout-serin-fleet"]
    );
    let meta = json!({"name": "checkout-serin-fleet", "namespace": "shop",
                      "annotations": {"serin.dev/fleet": "checkout"}});
    assert_eq!(
        docs[0],
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})
    );
    assert_eq!(
        docs[1],
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
               "rules": contract_rules("checkout")})
    );
    assert_least_privilege(&docs[1]);
    assert_eq!(
        docs[2],
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                           "name": "checkout-serin-fleet"},
               "subjects": [{"kind": "ServiceAccount", "name": "checkout-serin-fleet",
                             "namespace": "shop"}]})
    );
    let pod = &docs[3]["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "checkout-serin-fleet");
    assert!(
        pod.get("automountServiceAccountToken").is_none(),
        "the token is mounted by default"
    );
}

#[test]
fn fleet_binds_the_service_account_the_pod_already_names() {
    let (docs, report) = inject_fixture("fleet-service-account.yaml");
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["ServiceAccount", "Role", "RoleBinding", "StatefulSet"],
        "no ServiceAccount is written: the first is the input's own"
    );
    assert_eq!(
        docs[0],
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "ledger", "namespace": "bank"}})
    );
    assert_eq!(
        report,
        ["StatefulSet bank/ledger: injected (inbound); fleet ledger.v2: Role and RoleBinding bank/ledger-serin-fleet for its ServiceAccount ledger"]
    );
    // The annotation was on the workload, and the name has a dot: the Lease follows it.
    assert_eq!(docs[1]["rules"], contract_rules("ledger.v2"));
    assert_least_privilege(&docs[1]);
    assert_eq!(
        docs[2]["subjects"],
        json!([{"kind": "ServiceAccount", "name": "ledger", "namespace": "bank"}])
    );
    assert_eq!(docs[2]["roleRef"]["name"], "ledger-serin-fleet");
    let pod = &docs[3]["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "ledger", "left as it was");
    let env = sidecar_env(pod);
    assert!(
        env.contains(&json!({"name": "SERIN_FLEET", "value": "$(SERIN_POD_NAMESPACE)/ledger.v2"}))
    );
}

#[test]
fn fleet_rbac_without_a_namespace_follows_kubectl_apply_n() {
    let (docs, _) = inject_fixture("fleet-no-namespace.yaml");
    for d in &docs[..3] {
        assert!(d["metadata"].get("namespace").is_none(), "{d}");
    }
    assert_eq!(
        docs[2]["subjects"],
        json!([{"kind": "ServiceAccount", "name": "frontend-serin-fleet"}]),
        "a RoleBinding's ServiceAccount subject without a namespace is in the binding's"
    );
    assert_eq!(docs[1]["rules"], contract_rules("api"));
    let pod = &docs[3]["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "frontend-serin-fleet");
    assert_eq!(
        pod["containers"][1]["args"][2], "127.0.0.1:15080",
        "outbound"
    );
}

#[test]
fn an_invalid_fleet_name_is_refused_naming_the_annotation() {
    let text = std::fs::read_to_string(fixtures().join("err-fleet-name.yaml")).unwrap();
    let e = inject::inject_manifests(&text, &InjectOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "cannot inject Deployment shop/checkout: annotation serin.dev/fleet: \"Checkout_V2\" is not a valid SerinRollout name: use a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)"
    );
    let long = text.replace("Checkout_V2", &"a".repeat(248));
    let e = inject::inject_manifests(&long, &InjectOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 247 fit"), "{e}");
}

fn args(cmdline: &[&str]) -> InjectArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        inject: InjectArgs,
    }
    let mut argv = vec!["serin-inject"];
    argv.extend_from_slice(cmdline);
    Cli::try_parse_from(argv).unwrap().inject
}

#[test]
fn cli_reads_a_file_or_stdin_and_reports_on_stderr() {
    let file = fixtures().join("pod.yaml");
    let a = args(&["-f", file.to_str().unwrap()]);
    let opts = InjectOptions::from_args(&a).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    inject::inject_cli(&a, &opts, std::io::empty(), &mut out, &mut err).unwrap();
    let golden = std::fs::read_to_string(fixtures().join("pod.golden.yaml")).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), golden);
    assert_eq!(
        String::from_utf8(err).unwrap(),
        "Pod shop/debug-shop: injected (inbound)\n"
    );

    let a = args(&["-f", "-", "--image", "example/serin:test"]);
    let opts = InjectOptions::from_args(&a).unwrap();
    let stdin = std::fs::read(&file).unwrap();
    let mut out = Vec::new();
    inject::inject_cli(&a, &opts, stdin.as_slice(), &mut out, std::io::sink()).unwrap();
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("image: example/serin:test"));

    let a = args(&["-f", "/nonexistent/serin.yaml"]);
    let e = inject::inject_cli(
        &a,
        &opts,
        std::io::empty(),
        std::io::sink(),
        std::io::sink(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot read /nonexistent/serin.yaml"),
        "{e}"
    );

    let a = args(&["-f", "-", "--proxy-port", "15901"]);
    assert!(
        InjectOptions::from_args(&a).is_err(),
        "proxy and admin ports must differ"
    );
}

#[test]
fn outbound_flag_is_the_default_mode_for_unannotated_objects() {
    let text = std::fs::read_to_string(fixtures().join("outbound.yaml"))
        .unwrap()
        .replace("serin.dev/mode: outbound", "x-team: web");
    let a = args(&["-f", "-", "--outbound"]);
    let out = inject::inject_manifests(&text, &InjectOptions::from_args(&a).unwrap()).unwrap();
    assert_eq!(out.report[0].outcome, Outcome::Injected(Mode::Outbound));
}

// === the webhook, over HTTPS ===

/// How often the webhook under test re-reads its certificate and key.
const WEBHOOK_RELOAD: Duration = Duration::from_millis(50);

struct Webhook {
    addr: std::net::SocketAddr,
    client: Arc<rustls::ClientConfig>,
    /// Where `tls.crt` and `tls.key` are.
    dir: PathBuf,
    /// The webhook's TLS, reloaded while it lives.
    _tls: serin_proxy::tls::Listener,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Webhook {
    async fn start() -> Self {
        // One folder per server: tests run in parallel in one process.
        static SERVERS: AtomicUsize = AtomicUsize::new(0);
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("inject-webhook-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let certified = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
        let tls = inject::tls(&cert, &key, WEBHOOK_RELOAD).unwrap();
        let acceptor = tls.acceptor();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let opts = Arc::new(InjectOptions::default());
        let task = tokio::spawn(async move {
            inject::serve(listener, acceptor, opts, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });

        Self {
            addr,
            client: client_trusting(certified.cert.der()),
            dir,
            _tls: tls,
            stop: Some(stop),
            task,
        }
    }

    async fn request(&self, method: Method, path: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        self.request_over(false, method, path, body).await
    }

    /// One request on a new TLS connection, over HTTP/2 (ALPN `h2`, as the API server
    /// prefers) or HTTP/1.1.
    async fn request_over(
        &self,
        h2: bool,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Vec<u8>) {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let mut client = (*self.client).clone();
        if h2 {
            client.alpn_protocols = vec![b"h2".to_vec()];
        }
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = ServerName::IpAddress(self.addr.ip().into());
        let tls = connector.connect(name, tcp).await.unwrap();
        let req = Request::builder()
            .method(method)
            .uri(format!("https://serin-injector.serin-system.svc{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let res = if h2 {
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
            let executor = hyper_util::rt::TokioExecutor::new();
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(executor, TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        };
        let status = res.status();
        (
            status,
            res.into_body().collect().await.unwrap().to_bytes().to_vec(),
        )
    }

    async fn review(&self, body: Vec<u8>) -> Value {
        let (status, body) = self.request(Method::POST, "/inject", body).await;
        assert_eq!(status, StatusCode::OK);
        let review: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        assert_eq!(
            review["response"]["allowed"], true,
            "the webhook never blocks a pod"
        );
        review["response"].clone()
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn admission_review(uid: &str, pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    }))
    .unwrap()
}

/// The pod a ReplicaSet would create from `deployment.yaml`'s template.
fn shop_pod() -> Value {
    let text = std::fs::read_to_string(fixtures().join("deployment.yaml")).unwrap();
    let deployment = &inject::parse_documents(&text).unwrap()[0];
    let mut pod = deployment["spec"]["template"].clone();
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["generateName"] = json!("shop-7d9f8b6c4-");
    pod
}

fn apply_patch(pod: &Value, response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let ops: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &ops).unwrap();
    patched
}

#[tokio::test]
async fn webhook_patches_an_opted_in_pod_like_the_cli_does() {
    let hook = Webhook::start().await;
    let pod = shop_pod();
    let response = hook
        .review(admission_review(
            "705ab4f5-6393-11e8-b7cc-42010a800002",
            &pod,
        ))
        .await;
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert!(response.get("warnings").is_none(), "{response}");
    let patched = apply_patch(&pod, &response);

    let cli = inject::inject_manifests(
        &serde_json::to_string(&pod).unwrap(),
        &InjectOptions::default(),
    )
    .unwrap();
    assert_eq!(patched, inject::parse_documents(&cli.output).unwrap()[0]);
    assert_eq!(patched["spec"]["containers"][1]["name"], "serin");
    assert_eq!(
        patched["spec"]["containers"][0]["ports"][0]["name"],
        "app-http"
    );

    // The same review over HTTP/2 gets the same patch.
    let (status, body) = hook
        .request_over(
            true,
            Method::POST,
            "/inject",
            admission_review("705ab4f5-6393-11e8-b7cc-42010a800002", &pod),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let over_h2: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(over_h2["response"], response);

    // The API server re-sends the patched pod on reinvocation: nothing more to do.
    let again = hook.review(admission_review("second", &patched)).await;
    assert!(again.get("patch").is_none(), "{again}");
    hook.stop().await;
}

#[tokio::test]
async fn webhook_gives_a_fleet_pod_the_cli_sidecar_but_no_rbac() {
    let hook = Webhook::start().await;
    let mut pod = shop_pod();
    pod["metadata"]["annotations"]["serin.dev/fleet"] = json!("shop");
    let response = hook.review(admission_review("fleet", &pod)).await;
    assert!(response.get("warnings").is_none(), "{response}");
    let patched = apply_patch(&pod, &response);
    assert_eq!(
        patched["spec"]["serviceAccountName"], "shop",
        "the webhook patches only the pod: the account it runs as must be bound already"
    );
    let env = sidecar_env(&patched["spec"]);
    assert_eq!(
        env.last().unwrap(),
        &json!({"name": "SERIN_FLEET", "value": "$(SERIN_POD_NAMESPACE)/shop"})
    );

    // The CLI gives the same pod the same sidecar, and writes the RBAC before it.
    let cli = inject::inject_manifests(
        &serde_json::to_string(&pod).unwrap(),
        &InjectOptions::default(),
    )
    .unwrap();
    let docs = inject::parse_documents(&cli.output).unwrap();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Role", "RoleBinding", "Pod"]);
    assert_eq!(docs[2], patched);
    assert_eq!(docs[0]["metadata"]["name"], "shop-7d9f8b6c4-serin-fleet");
    assert_eq!(docs[1]["subjects"][0]["name"], "shop");

    // A pod that turned its token off is allowed unchanged, and told why.
    pod["spec"]["automountServiceAccountToken"] = json!(false);
    let response = hook.review(admission_review("no-token", &pod)).await;
    assert!(response.get("patch").is_none(), "{response}");
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("serin.dev/fleet")
            && warning.contains("automountServiceAccountToken: false"),
        "{warning}"
    );
    hook.stop().await;
}

#[tokio::test]
async fn webhook_allows_with_a_warning_what_it_cannot_handle() {
    let hook = Webhook::start().await;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "not JSON",
            b"{\"apiVersion\": \"admission.k8s.io/v1\", \"kind\": \"Admiss".to_vec(),
        ),
        (
            "no request",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        ),
        ("not an object", b"[1, 2, 3]".to_vec()),
        ("empty body", Vec::new()),
        (
            "no uid",
            br#"{"kind":"AdmissionReview","request":{"object":{"kind":"Pod"}}}"#.to_vec(),
        ),
    ];
    for (what, body) in cases {
        let response = hook.review(body).await;
        let warning = response["warnings"][0].as_str().unwrap_or_default();
        assert!(
            warning.contains("malformed AdmissionReview"),
            "{what}: {response}"
        );
        assert!(response.get("patch").is_none(), "{what}");
    }

    // An opted-in pod without the named port: allowed unchanged, and the warning says why.
    let mut pod = shop_pod();
    pod["spec"]["containers"][0]["ports"][0]["name"] = json!("web");
    let response = hook.review(admission_review("no-port", &pod)).await;
    assert_eq!(response["uid"], "no-port");
    assert!(response.get("patch").is_none());
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("Pod shop/shop-7d9f8b6c4-*") && warning.contains("no named port"),
        "{warning}"
    );

    // A pod that did not opt in, and a DELETE (no object): allowed, no patch, no warning.
    let mut plain = shop_pod();
    plain["metadata"]["annotations"] = json!({});
    for body in [
        admission_review("plain", &plain),
        admission_review("delete", &Value::Null),
    ] {
        let response = hook.review(body).await;
        assert!(
            response.get("patch").is_none() && response.get("warnings").is_none(),
            "{response}"
        );
    }

    let (status, body) = hook.request(Method::GET, "/healthz", Vec::new()).await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::OK, b"ok\n".as_slice())
    );
    let (status, _) = hook.request(Method::GET, "/inject", Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    hook.stop().await;
}

/// A client trusting only `cert`.
fn client_trusting(cert: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert.to_vec())).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_serves_a_renewed_certificate_without_a_restart() {
    let hook = Webhook::start().await;
    let renewed = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    for (file, pem) in [
        ("tls.key", renewed.key_pair.serialize_pem()),
        ("tls.crt", renewed.cert.pem()),
    ] {
        let tmp = hook.dir.join("renewed.tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, hook.dir.join(file)).unwrap();
    }
    let handshake = |client: Arc<rustls::ClientConfig>| async move {
        let tcp = TcpStream::connect(hook.addr).await.unwrap();
        let name = ServerName::IpAddress(hook.addr.ip().into());
        tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .is_ok()
    };
    let trusting_renewed = client_trusting(renewed.cert.der());
    eventually(
        Duration::from_secs(20),
        "new connections get the renewed certificate",
        || handshake(trusting_renewed.clone()),
    )
    .await;
    assert!(
        !handshake(hook.client.clone()).await,
        "the old certificate is no longer served"
    );
    hook.stop().await;
}

#[test]
fn tls_names_the_unusable_file() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("inject-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let e = inject::tls(&empty, &empty, WEBHOOK_RELOAD)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("empty.pem") && e.contains("no certificate found"),
        "{e}"
    );
}
