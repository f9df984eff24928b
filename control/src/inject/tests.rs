//! Unit tests of `serin inject`: the CLI shape, injection, refusals, pass-through, and
//! the fleet's RBAC objects meeting each other and the manifest's own.

use super::*;
use serde_json::json;

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations:
        serin.dev/inject: enabled
        serin.dev/canary: http://web-canary.shop.svc:80
        serin.dev/max-error-rate: "0.02"
    spec:
      containers:
        - name: web
          image: web:1
          ports:
            - {name: http, containerPort: 8080}
          readinessProbe:
            httpGet: {path: /ready, port: http}
"#;

fn inject(input: &str) -> Result<Injection, InjectError> {
    inject_manifests(input, &InjectOptions::default())
}

fn pod_spec(out: &str) -> Value {
    parse_documents(out).unwrap()[0]
        .pointer("/spec/template/spec")
        .unwrap()
        .clone()
}

#[test]
fn inbound_takes_over_the_http_port_and_renames_the_apps() {
    let out = inject(WEB).unwrap();
    assert_eq!(out.report[0].outcome, Outcome::Injected(Mode::Inbound));
    let spec = pod_spec(&out.output);
    let app = &spec["containers"][0];
    assert_eq!(app["ports"][0]["name"], "app-http");
    assert_eq!(app["readinessProbe"]["httpGet"]["port"], "app-http");
    let serin = &spec["containers"][1];
    assert_eq!(serin["name"], "serin");
    assert_eq!(
        serin["ports"][0],
        json!({"name": "http", "containerPort": 15080, "protocol": "TCP"})
    );
    let args: Vec<&str> = serin["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "run",
            "--listen",
            "0.0.0.0:15080",
            "--stable",
            "http://127.0.0.1:8080",
            "--canary",
            "http://web-canary.shop.svc:80",
            "--admin",
            "0.0.0.0:15901",
            "--state-dir",
            "/var/run/serin"
        ]
    );
    let env = serin["env"].as_array().unwrap();
    assert!(env.contains(&json!({"name": "SERIN_JUDGE_MAX_ERROR_RATE", "value": "0.02"})));
    assert!(
        !env.iter().any(|e| e["name"] == "SERIN_ACCESS_LOG"),
        "no access log unless asked"
    );
    assert_eq!(serin["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(spec["volumes"][0]["name"], "serin-state");
}

#[test]
fn the_access_log_annotation_turns_the_sidecars_on() {
    let logged = WEB.replace(
        "serin.dev/max-error-rate",
        "serin.dev/access-log: stdout\n        serin.dev/max-error-rate",
    );
    let spec = pod_spec(&inject(&logged).unwrap().output);
    let env = spec["containers"][1]["env"].as_array().unwrap().clone();
    assert!(env.contains(&json!({"name": "SERIN_ACCESS_LOG", "value": "stdout"})));
}

#[test]
fn injecting_twice_changes_nothing() {
    let once = inject(WEB).unwrap().output;
    let twice = inject(&once).unwrap();
    assert_eq!(twice.output, once);
    assert_eq!(twice.report[0].outcome, Outcome::AlreadyInjected);
}

#[test]
fn refusals_name_the_object_and_say_what_to_do() {
    let no_port = WEB.replace("name: http,", "name: web,");
    let e = inject(&no_port).unwrap_err().to_string();
    assert!(
        e.contains("Deployment shop/web") && e.contains("no named port"),
        "{e}"
    );

    let bad_log = WEB.replace(
        "serin.dev/max-error-rate",
        "serin.dev/access-log: /var/log/a.log\n        serin.dev/max-error-rate",
    );
    let e = inject(&bad_log).unwrap_err().to_string();
    assert!(
        e.contains("serin.dev/access-log") && e.contains("must be stdout or off"),
        "{e}"
    );

    let bad_rate = WEB.replace("\"0.02\"", "\"5\"");
    let e = inject(&bad_rate).unwrap_err().to_string();
    assert!(e.contains("write 0.05 for 5%"), "{e}");

    let no_canary = WEB.replace("serin.dev/canary: http://web-canary.shop.svc:80", "x: y");
    let e = inject(&no_canary).unwrap_err().to_string();
    assert!(e.contains("serin.dev/canary is missing"), "{e}");

    let job = "kind: Job\nmetadata: {name: j, annotations: {serin.dev/inject: enabled}}\n";
    let e = inject(job).unwrap_err().to_string();
    assert!(e.contains("Job j") && e.contains("unsupported kind"), "{e}");
}

#[test]
fn objects_that_do_not_opt_in_pass_through() {
    let input =
        "kind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80, targetPort: http}]\n";
    let out = inject(input).unwrap();
    assert!(out.report.is_empty());
    assert_eq!(
        parse_documents(&out.output).unwrap(),
        parse_documents(input).unwrap()
    );
    let plain = WEB.replace("serin.dev/inject: enabled", "serin.dev/inject: disabled");
    let out = inject(&plain).unwrap();
    assert_eq!(out.report[0].outcome, Outcome::NotOptedIn);
    assert_eq!(
        parse_documents(&out.output).unwrap(),
        parse_documents(&plain).unwrap()
    );
}

#[test]
fn outbound_listens_on_localhost_and_needs_a_stable_url() {
    let outbound = WEB.replace(
        "serin.dev/inject: enabled",
        "serin.dev/inject: enabled\n        serin.dev/mode: outbound",
    );
    let e = inject(&outbound).unwrap_err().to_string();
    assert!(e.contains("serin.dev/stable"), "{e}");
    let with_stable = outbound.replace(
        "serin.dev/mode: outbound",
        "serin.dev/mode: outbound\n        serin.dev/stable: http://api.shop.svc:80",
    );
    let spec = pod_spec(&inject(&with_stable).unwrap().output);
    assert_eq!(
        spec["containers"][0]["ports"][0]["name"], "http",
        "outbound renames nothing"
    );
    assert_eq!(spec["containers"][1]["args"][2], "127.0.0.1:15080");
    assert_eq!(spec["containers"][1]["args"][4], "http://api.shop.svc:80");
}

#[test]
fn cli_arguments_are_consistent() {
    use clap::{CommandFactory, Parser};
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        inject: InjectArgs,
    }
    Cli::command().debug_assert();
    assert!(
        Cli::try_parse_from(["inject"]).is_err(),
        "-f or --serve is required"
    );
    assert!(
        Cli::try_parse_from(["inject", "--serve"]).is_err(),
        "--serve needs TLS files"
    );
    assert!(Cli::try_parse_from([
        "inject",
        "--serve",
        "-f",
        "x",
        "--tls-cert",
        "c",
        "--tls-key",
        "k"
    ])
    .is_err());
    let serve =
        Cli::try_parse_from(["inject", "--serve", "--tls-cert", "c", "--tls-key", "k"]).unwrap();
    assert_eq!(serve.inject.listen.to_string(), "0.0.0.0:8443");
}

#[test]
fn list_items_are_named_by_their_position() {
    let list = format!(
        "kind: List\napiVersion: v1\nitems:\n- {}",
        WEB.replace("name: http,", "name: web,")
            .trim()
            .replace('\n', "\n  ")
    );
    let e = inject(&list).unwrap_err().to_string();
    assert!(
        e.starts_with("cannot inject Deployment shop/web (List item 1): no named port"),
        "{e}"
    );
}

#[test]
fn other_unsafe_pods_are_refused() {
    let cases = [
        (
            WEB.replace(
                "      containers:",
                "      hostNetwork: true\n      containers:",
            ),
            "hostNetwork",
        ),
        (
            WEB.replace(
                "      containers:",
                "      volumes: [{name: serin-state, emptyDir: {}}]\n      containers:",
            ),
            "volume name clash",
        ),
        (
            WEB.replace("name: http,", "name: web-frontend,").replace(
                "serin.dev/inject: enabled",
                "serin.dev/inject: enabled\n        serin.dev/port: web-frontend",
            ),
            "too long",
        ),
        (WEB.replace("\"0.02\"", "0.02"), "must be a string"),
        (
            WEB.replace("serin.dev/inject: enabled", "serin.dev/inject: \"true\""),
            "must be enabled or disabled",
        ),
        (
            WEB.replace("http://web-canary.shop.svc:80", "web-canary:80"),
            "is not an http:// or https:// URL",
        ),
        (
            WEB.replace("\"0.02\"", "\"0.02\"\n        serin.dev/max-p95: fast"),
            "positive duration",
        ),
    ];
    for (input, problem) in cases {
        let e = inject(&input).unwrap_err().to_string();
        assert!(
            e.starts_with("cannot inject Deployment shop/web: ") && e.contains(problem),
            "{problem}: {e}"
        );
    }
}

fn fleet_web(fleet: &str) -> String {
    WEB.replace(
        "serin.dev/inject: enabled",
        &format!("serin.dev/inject: enabled\n        serin.dev/fleet: {fleet}"),
    )
}

fn kinds_and_names(out: &str) -> Vec<String> {
    parse_documents(out)
        .unwrap()
        .iter()
        .map(|d| {
            format!(
                "{} {}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn two_workloads_of_one_name_share_identical_rbac_and_clash_on_different_rbac() {
    let statefulset = fleet_web("web").replace("kind: Deployment", "kind: StatefulSet");
    let both = format!("{}---{statefulset}", fleet_web("web"));
    let out = inject(&both).unwrap();
    assert_eq!(
        kinds_and_names(&out.output),
        [
            "ServiceAccount web-serin-fleet",
            "Role web-serin-fleet",
            "RoleBinding web-serin-fleet",
            "Deployment web",
            "StatefulSet web"
        ],
        "written once"
    );
    let other = format!(
        "{}---{}",
        fleet_web("web"),
        statefulset.replace("fleet: web", "fleet: api")
    );
    let e = inject(&other).unwrap_err().to_string();
    assert_eq!(
        e,
        "cannot inject StatefulSet shop/web (document 2): ServiceAccount shop/web-serin-fleet is also written for Deployment shop/web (document 1), with other content; rename or remove one of them"
    );
}

#[test]
fn rbac_already_in_the_manifest_is_kept_when_equal_and_refused_when_not() {
    let once = inject(&fleet_web("web")).unwrap().output;
    // The RBAC documents and the un-injected workload together: nothing written twice.
    let rbac_only: Vec<&str> = once.split("---\n").take(3).collect();
    let input = format!("{}---\n{}", rbac_only.join("---\n"), fleet_web("web"));
    let out = inject(&input).unwrap();
    assert_eq!(out.output, once);

    let edited = input.replace("  - watch\n", "  - watch\n  - delete\n");
    let e = inject(&edited).unwrap_err().to_string();
    assert!(
        e.contains("Role shop/web-serin-fleet is already in the manifest, and differs"),
        "{e}"
    );
}

#[test]
fn binding_the_default_account_is_a_warning_and_pods_are_named_by_generate_name() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  generateName: debug-\n  namespace: shop\n  annotations:\n    serin.dev/inject: enabled\n    serin.dev/fleet: web\n    serin.dev/canary: http://c.shop.svc:80\nspec:\n  serviceAccountName: default\n  containers:\n  - name: d\n    image: d\n    ports:\n    - {name: http, containerPort: 80}\n";
    let out = inject(pod).unwrap();
    let line = out.report[0].to_string();
    assert!(
        line.starts_with("Pod shop/debug-*: injected (inbound); fleet web: Role and RoleBinding shop/debug-serin-fleet for its ServiceAccount default; warning: ServiceAccount \"default\" is shared"),
        "{line}"
    );
    let e = inject(&pod.replace("  generateName: debug-\n", ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no metadata.name"), "{e}");
}

#[test]
fn the_webhook_front_writes_no_rbac() {
    let mut doc = parse_documents(&fleet_web("web")).unwrap().remove(0);
    let mut report = Vec::new();
    inject_object(
        &mut doc,
        &InjectOptions::default(),
        None,
        None,
        &mut report,
        None,
    )
    .unwrap();
    assert_eq!(report[0].outcome, Outcome::Injected(Mode::Inbound));
    assert!(report[0].notes.is_empty());
    assert!(doc
        .pointer("/spec/template/spec/serviceAccountName")
        .is_none());
}
